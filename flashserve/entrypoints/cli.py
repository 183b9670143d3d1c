"""Command line: flashserve fetch | generate | chat | serve | bench | quantize | profile-neurons."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

from flashserve.config import (EXECUTOR_BACKENDS, KV_CACHE_DTYPES, POLICY_CHOICES, PREEMPTION_MODES,
                               QUANTIZATION_CHOICES, SCHEDULING_CHOICES, SPECULATIVE_METHODS)
from flashserve.engine.arg_utils import EngineArgs
from flashserve.entrypoints.openai.tool_formats import PARSERS
from flashserve.errors import FlashserveError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """What decides how a model runs: the model, its compute dtype, its quantization (engines and `env`)."""
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file, a local HF directory, or a built-in name")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--quantization", default="auto", choices=list(QUANTIZATION_CHOICES),
                   help="auto: run a GGUF file's quantized weights on int4/int8 kernels with int8-rounded "
                        "activations; weight-only: the same kernels on float activations; none: dequantize them; "
                        "smoothquant: int8 weights and activations after SmoothQuant's smoothing (Xiao et al. 2022); "
                        "llm.int8: int8 weights and activations, outlier input columns in float (Dettmers et al. 2022)")


def _add_engine_args(p: argparse.ArgumentParser, max_num_seqs: int = 64) -> None:
    """Every EngineArgs field as a flag whose dest is the field's name (_engine_args relies on it)."""
    d = EngineArgs()
    _add_model_args(p)
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
    p.add_argument("--distributed-executor-backend", default=None, choices=list(EXECUTOR_BACKENDS),
                   help="where the model runs: uni (this process, one rank), mp (a process per rank) or ray "
                        "(a Ray actor per rank, over a Ray cluster's nodes); default uni for one rank, else mp")
    p.add_argument("--max-weight-memory", type=int, default=None, metavar="BYTES",
                   help="weights resident at once; the decoder layers beyond stream from a file of packed layers "
                        "(written beside the model cache on the first run)")
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


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--stop", action="append", default=[])


def _engine_args(a) -> EngineArgs:
    return EngineArgs(**{f.name: getattr(a, f.name) for f in fields(EngineArgs)})


def _sampling(a):
    from flashserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, stop=a.stop)


def _stream(engine, prompt, params) -> str:
    """Run one request, printing text as it arrives; returns the whole text."""
    rid = engine.next_request_id()
    engine.add_request(rid, prompt, params)
    shown = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return shown


def cmd_fetch(a) -> None:
    from flashserve.model.catalogue import fetch

    print(fetch(a.name))


def _fit_context(config, num_tokens: int):
    """The engine config with its context cut to `num_tokens` (never raised): the KV pool is sized
    for max_num_seqs full contexts, and a one-shot request can never use more than its own."""
    sc = config.scheduler
    return replace(config, scheduler=replace(sc, max_model_len=min(sc.max_model_len, num_tokens)))


def one_shot_engine(a):
    """(engine, sampling params) of `generate`: a KV pool for the prompt and max_tokens, no more."""
    from flashserve.engine.llm_engine import LLMEngine
    from flashserve.tokenizer.tokenizer import Tokenizer

    params = _sampling(a)
    config = _engine_args(a).create_engine_config()
    tokenizer = Tokenizer.from_model_path(config.model_path)
    config = _fit_context(config, len(tokenizer.encode(a.prompt)) + params.max_tokens)
    return LLMEngine(config, tokenizer=tokenizer), params


def cmd_generate(a) -> None:
    engine, params = one_shot_engine(a)
    _stream(engine, a.prompt, params)


def cmd_chat(a) -> None:
    from flashserve.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(_engine_args(a))
    tok = engine.tokenizer
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("flashserve chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        reply = _stream(engine, {"prompt_token_ids": prompt_ids}, _sampling(a))
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(a) -> None:
    from flashserve.entrypoints.openai.app import run_server

    run_server(_engine_args(a), host=a.host, port=a.port, api_key=a.api_key, max_waiting=a.max_waiting,
               tool_call_parser=a.tool_call_parser)


def cmd_env(a) -> None:
    from flashserve.entrypoints.env import environment_report

    print("\n".join(environment_report(a.model, a.dtype, a.quantization)))


def cmd_bench(a) -> None:
    """Runs benchmarks/bench.py with every argument after `bench`, or benchmarks/startup.py for
    `bench --startup` (a source checkout has them)."""
    name = "startup.py" if "--startup" in a.bench_args else "bench.py"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / name
    if not script.is_file():
        raise FlashserveError(f"flashserve bench runs benchmarks/{name}, which only a source checkout of flashserve has")
    sys.exit(subprocess.call([sys.executable, str(script), *(x for x in a.bench_args if x != "--startup")]))


def cmd_train_heads(a) -> None:
    """python -m flashserve.spec_decode.train with every argument after `train-heads`."""
    from flashserve.spec_decode.train import main as train_main

    train_main(a.bench_args)


def cmd_quantize(a) -> None:
    from tqdm import tqdm

    if a.method == "gguf":
        return _quantize_gguf(a)
    from flashserve.quantization.quantize import QuantizeArgs, quantize_model

    args = QuantizeArgs(method=a.method, model=a.model, out=a.out, group_size=a.group_size, calib=a.calib,
                        act_order=a.act_order)
    summary = quantize_model(args, progress=lambda layers: tqdm(layers, desc=f"{a.method}", unit="layer"))
    for note in summary["notes"]:
        print(note)
    print(f"wrote {a.out} ({a.method}, group size {a.group_size}, {summary['calibration_tokens']} calibration "
          f"tokens); peak memory {summary['peak_rss_mib']:.0f} MiB")


def cmd_profile_neurons(a) -> None:
    from flashserve.model.catalogue import resolve
    from flashserve.offload.neuron_profile import profile_model

    options = ("threshold", "seq_len", "max_seqs", "target_recall")
    given = {k: getattr(a, k) for k in options if getattr(a, k) is not None}
    profile = profile_model(str(resolve(a.model)), a.calib, predictor_rank=a.predictor_rank, **given)
    profile.save(a.out)
    print(profile.table())
    if profile.predictor is not None:
        p = profile.predictor
        print(f"predictor rank {p['rank']}: held-out recall {p['recall'].mean():.3f} "
              f"(min {p['recall'].min():.3f}), neurons predicted active {p['predicted_active'].mean():.3f}")
    print(f"wrote {a.out}")


def _quantize_gguf(a) -> None:
    from tqdm import tqdm

    from flashserve.quantization.gguf_export import GGUFQuantizeArgs, quantize_gguf

    args = GGUFQuantizeArgs(model=a.model, out=a.out, qtype=a.type, output_type=a.output_type, imatrix=a.imatrix)
    summary = quantize_gguf(args, progress=lambda ts: tqdm(ts, desc=a.type, unit="tensor"))
    for note in summary["notes"]:
        print(note)
    types = ", ".join(f"{n} {k}" for k, n in summary["types"].most_common())
    print(f"wrote {a.out} ({types} tensors{', importance matrix ' + a.imatrix if a.imatrix else ''}); "
          f"peak memory {summary['peak_rss_mib']:.0f} MiB")


def cmd_imatrix(a) -> None:
    import resource

    from tqdm import tqdm

    from flashserve.quantization.imatrix import compute_imatrix, save_imatrix

    if Path(a.out).exists():
        raise FlashserveError(f"{a.out} exists; choose a new output path")
    imatrix, tokens = compute_imatrix(a.model, a.calib, max_seqs=a.max_seqs,
                                      progress=lambda s: tqdm(s, desc="imatrix", unit="seq"))
    save_imatrix(a.out, imatrix, tokens, a.calib)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"wrote {a.out} ({len(imatrix)} weights, {tokens} calibration tokens); peak memory {peak:.0f} MiB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashserve", description="LLM inference and serving")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="this CPU's features, the kernels built for it, and the dtype chosen for a model")
    _add_model_args(p)
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("fetch", help="download a built-in model into the cache and print its path")
    p.add_argument("name")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("generate", help="complete one prompt, streaming the text")
    _add_engine_args(p, max_num_seqs=1)
    _add_sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_engine_args(p, max_num_seqs=1)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="optional system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-waiting", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--tool-call-parser", default=None, choices=sorted(PARSERS),
                   help="the format of the model's tool calls (default: read from its chat template)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="write a 4-bit GPTQ or AWQ checkpoint (Hugging Face format) of a float "
                                        "model, calibrated on a text file, or a GGUF file of another type")
    p.add_argument("--method", required=True, choices=["gptq", "awq", "rtn", "rtn-sym", "gguf"],
                   help="rtn / rtn-sym: round-to-nearest baselines in the AWQ / GPTQ format; "
                        "gguf: a GGUF file (from a GGUF file) of --type, weighted by --imatrix")
    p.add_argument("--type", default="Q4_K", help="gguf: the linears' type (Q4_K Q5_K Q6_K Q8_0 Q4_0 Q4_1 Q5_0 "
                                                  "Q5_1); K-quants on rows not a multiple of 256 fall back as "
                                                  "llama.cpp's do (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0)")
    p.add_argument("--output-type", default="Q6_K", help="gguf: the type of the embedding and LM head")
    p.add_argument("--imatrix", default=None, metavar="FILE", help="gguf: an importance matrix (flashserve imatrix)")
    p.add_argument("--model", default="smollm2-135m",
                   help="the float model: an HF directory, or a .gguf file or built-in name (dequantized)")
    p.add_argument("--out", required=True, help="the checkpoint directory to create (must not exist)")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128])
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text (default: the GNU GPL v3 text Debian ships in its common licences)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation (desc_act)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("imatrix", help="the importance matrix (mean squared input activation per column of every "
                                       "linear weight) of a model on calibration text, for quantize --method gguf")
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file, a local HF directory, or a built-in name")
    p.add_argument("--calib", required=True, metavar="FILE", help="calibration text")
    p.add_argument("--out", required=True, help="the .imatrix file to write (safetensors; must not exist)")
    p.add_argument("--max-seqs", type=int, default=32, help="calibration sequences of 512 tokens at most")
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("profile-neurons", help="how often each FFN neuron is active on calibration text (per layer "
                                               "sparsity; optionally a low-rank activity predictor), for "
                                               "--hot-neuron-profile")
    p.add_argument("--model", default="smollm2-135m", help="a .gguf file, a local HF directory, or a built-in name")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration text (default: the GNU GPL v3 text Debian ships in its common licences)")
    p.add_argument("--out", required=True, help="the profile file to write")
    # Defaults (None here) are profile_model's, so the parser needs no torch import.
    p.add_argument("--threshold", type=float, default=None,
                   help="a neuron is active at a token when its contribution |a_j| ||down[:, j]|| exceeds this "
                        "fraction of the token's largest (default 0.01)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration sequence (default 512)")
    p.add_argument("--max-seqs", type=int, default=None, help="calibration sequences (default 4)")
    p.add_argument("--predictor-rank", type=int, default=None, metavar="R",
                   help="also train a rank-R activity predictor per layer (needed by --neuron-predictor)")
    p.add_argument("--target-recall", type=float, default=None,
                   help="the predictor's cutoff: this fraction of the active neurons of the training tokens predicted "
                        "active (default 0.99; lower skips more and changes more)")
    p.set_defaults(func=cmd_profile_neurons)

    # Its options (see `flashserve bench --help`) belong to benchmarks/bench.py and pass through unparsed;
    # `flashserve bench --startup [--help]` runs benchmarks/startup.py instead.
    p = sub.add_parser("bench", add_help=False, help="the CPU benchmark table: flashserve beside llama.cpp and "
                                                     "transformers (--startup: start-up time and memory)")
    p.set_defaults(func=cmd_bench)

    # Its options (see `flashserve train-heads --help`) belong to flashserve/spec_decode/train.py.
    p = sub.add_parser("train-heads", add_help=False, help="train Medusa heads or an EAGLE layer on a model's own "
                                                           "answers, for speculative decoding")
    p.set_defaults(func=cmd_train_heads)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("bench", "train-heads"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.bench_args = extra
    try:
        args.func(args)
    except (FlashserveError, ValueError) as exc:
        print(f"flashserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
