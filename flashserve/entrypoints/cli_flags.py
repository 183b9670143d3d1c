"""The command line's shared flags: what runs a model (every EngineArgs field, by its name) and how it
samples, and their values → EngineArgs and SamplingParams. The subcommands that run a model take
them (cli_run.py); tests build engines from parsed flags with engine_args_from."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from flashserve.config import (EXECUTOR_BACKENDS, KV_CACHE_DTYPES, POLICY_CHOICES, PREEMPTION_MODES,
                               QUANTIZATION_CHOICES, SCHEDULING_CHOICES, SPECULATIVE_METHODS)
from flashserve.engine.arg_utils import EngineArgs


def add_model_args(p: argparse.ArgumentParser) -> None:
    """What decides how a model runs: the model, its compute dtype, its quantization (engines and `env`)."""
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file, a local HF directory, or a built-in name")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", default="auto", choices=list(QUANTIZATION_CHOICES),
                   help="auto: run a GGUF file's quantized weights on int4/int8 kernels with int8-rounded "
                        "activations; weight-only: the same kernels on float activations; none: dequantize them; "
                        "smoothquant: int8 weights and activations after SmoothQuant's smoothing (Xiao et al. 2022); "
                        "llm.int8: int8 weights and activations, outlier input columns in float (Dettmers et al. 2022)")


def add_engine_args(p: argparse.ArgumentParser, max_num_seqs: int = 64) -> None:
    """Every EngineArgs field as a flag whose dest is the field's name (engine_args_from relies on it)."""
    d = EngineArgs()
    add_model_args(p)
    p.add_argument("--smoothquant-alpha", type=float, default=d.smoothquant_alpha,
                   help="smoothquant: migration strength alpha in s = max|X|^alpha / max|W|^(1 - alpha)")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="smoothquant: text whose activation maxima set the scales (default: Debian's GPL-3 text)")
    p.add_argument("--smoothquant-down-proj", action="store_true",
                   help="smoothquant: also smooth down_proj's input, folding the scales into up_proj's rows "
                        "(beyond the paper, which smooths only the inputs that follow a norm)")
    p.add_argument("--llm-int8-threshold", type=float, default=d.llm_int8_threshold,
                   help="llm.int8: |activation| from which an input column takes the float path")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output; default: the model's context, at most 4096")
    p.add_argument("--max-num-seqs", type=int, default=max_num_seqs,
                   help="sequences run together; the KV pool holds this many full contexts")
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one step: running decodes first, then chunks of waiting prompts")
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block (a power of two)")
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes of KV cache")
    p.add_argument("--kv-cache-fraction", type=float, default=d.kv_cache_fraction,
                   help="without --kv-cache-memory: cap of the KV cache as a fraction of available RAM")
    p.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES))
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching,
                   help="reuse the KV blocks of a shared prompt prefix")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--swap-space", type=int, default=d.swap_space, metavar="BYTES",
                   help="host memory for the KV blocks of preempted requests, copied back when they resume")
    p.add_argument("--preemption-mode", default=d.preemption_mode, choices=list(PREEMPTION_MODES),
                   help="recompute a preempted request's KV, swap it out (recompute when the swap space is full), "
                        "or auto: swap when copying costs less than recomputing")
    p.add_argument("--scheduling", default=d.scheduling, choices=list(SCHEDULING_CHOICES),
                   help="continuous batching, or the static baseline")
    p.add_argument("--policy", default=d.policy, choices=list(POLICY_CHOICES),
                   help="waiting-queue order; priority: a request's lower `priority` value goes first")
    p.add_argument("--threads", dest="num_threads", type=int, default=None, metavar="N", help="torch threads")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size, metavar="N",
                   help="split the model over N worker processes (tensor parallelism)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=d.pipeline_parallel_size, metavar="N",
                   help="split the model's layers over N worker processes (pipeline parallelism)")
    p.add_argument("--pipeline-micro-batches", type=int, default=None, metavar="N",
                   help="steps in flight under pipeline parallelism, each over its own share of the requests "
                        "(default: one per stage, so the stages overlap; 1: no overlap)")
    p.add_argument("--distributed-executor-backend", default=None, choices=list(EXECUTOR_BACKENDS),
                   help="where the model runs: uni (this process, one rank), mp (a process per rank) or ray "
                        "(a Ray actor per rank, over a Ray cluster's nodes); default uni for one rank, else mp")
    p.add_argument("--max-weight-memory", type=int, default=None, metavar="BYTES",
                   help="weights resident at once; the decoder layers beyond stream from a file of packed layers "
                        "(written beside the model cache on the first run)")
    p.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="leave the weights in 4 KiB pages: a shorter start-up, slower decode steps "
                        "(remapping them costs seconds a GiB on some machines)")
    p.add_argument("--no-weight-cache", dest="weight_cache", action="store_false",
                   help="pack the model's weights at every start instead of mapping the packed weights saved "
                        "by the first start (model/weight_cache.py: one file per model beside the model cache)")
    p.add_argument("--hot-neuron-profile", default=None, metavar="FILE",
                   help="a neuron profile (flashserve profile-neurons; needs --quantization none): with "
                        "--neuron-predictor, cold FFN neurons predicted inactive are skipped, exact or off")
    p.add_argument("--hot-neuron-fraction", type=float, default=d.hot_neuron_fraction, metavar="F",
                   help="fraction of each layer's FFN neurons, most often active first, always computed")
    p.add_argument("--neuron-predictor", action="store_true",
                   help="skip the cold neurons the profile's low-rank predictor calls inactive, unless that changes "
                        "greedy tokens on check prompts (then the model runs dense, with a warning)")
    p.add_argument("--neuron-predictor-max-disagreement", type=float, default=d.neuron_predictor_max_disagreement,
                   metavar="F", help="fraction of greedy check tokens skipping may change (default 0: none)")
    p.add_argument("--worker-timeout", dest="worker_timeout_s", type=float, default=d.worker_timeout_s,
                   metavar="SECONDS", help="a worker silent this long in start-up or a step counts as hung")
    p.add_argument("--speculative-method", default=None, choices=list(SPECULATIVE_METHODS),
                   help="speculative decoding: ngram = prompt lookup (drafts copied from earlier in prompt + output); "
                        "draft_model = a smaller model with the same vocabulary (--speculative-model)")
    p.add_argument("--speculative-model", default=None, metavar="MODEL",
                   help="the draft model of draft_model: a .gguf file, a local HF directory or a built-in name")
    p.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens, metavar="K",
                   help="draft tokens verified per request and step")
    p.add_argument("--prompt-lookup-min", type=int, default=d.prompt_lookup_min, metavar="N",
                   help="shortest n-gram prompt lookup matches")
    p.add_argument("--prompt-lookup-max", type=int, default=d.prompt_lookup_max, metavar="N",
                   help="longest n-gram prompt lookup matches (tried first)")
    p.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='vLLM\'s spelling, instead of the flags above: \'{"method": "draft_model", "model": '
                        '"qwen2.5-coder-0.5b", "num_speculative_tokens": 4}\'')


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--stop", action="append", default=[])


def engine_args_from(a) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(a, f.name) for f in fields(EngineArgs)})


def sampling_params_from(a):
    from flashserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, stop=a.stop)
