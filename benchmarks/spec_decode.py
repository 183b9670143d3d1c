"""Speculative decoding beside plain decoding, flashserve and llama.cpp on the same GGUF file.

    python benchmarks/spec_decode.py [--model qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
        [--streams 1,4] [--k 4] [--max-tokens 128] [--repeats 2] [--threads 2]
        [--medusa HEADS.safetensors] [--eagle HEAD.safetensors] [--configs flashserve:plain,...]

Configurations (each run a process of its own; the configurations alternate within every round):
  flashserve plain, flashserve ngram (prompt lookup), flashserve draft (--draft drafting),
  flashserve medusa / eagle (heads trained by `flashserve train-heads`, given by --medusa / --eagle),
  each speculative one also as "-pinned" (ngram-pinned, ...: k drafts every step, adaptive k off) and
  "-typical" (Medusa's typical acceptance instead of rejection sampling; differs at --temperature > 0),
  llama.cpp plain, llama.cpp prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding) and llama.cpp
  draft (the --draft model in a llama.cpp context of its own proposing k greedy tokens through
  llama-cpp-python's draft-model interface, which the target verifies): one stream only, as its
  high-level API runs one sequence.
Workloads: "open" (write new code from a one-line request) and "grounded" (return a source file
given in the prompt with a small edit, where the output copies the input). Chat-formatted text,
the same string for both engines, greedy, stopping at the model's end of turn.

Per cell: end-to-end output tok/s (generated tokens / wall time from the request to the last token,
prompt processing included, the same prompt for every engine), median (min-max) over repeats, and the
ratio to llama.cpp plain of the same round (flashserve plain at 4 streams); for flashserve's speculative
rows the drafts accepted / proposed, from the engine's own counters.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import header

ROOT = Path(__file__).resolve().parents[1]
GROUNDED_FILE = ROOT / "flashserve" / "spec_decode" / "ngram.py"
WORKLOADS = {
    "open": "Write a Python function that parses an ISO 8601 date string and returns a datetime, with a docstring.",
    "grounded": "Here is a Python file:\n\n```python\n{file}```\n\nReturn the whole file unchanged except that the "
                "function ngram_draft is renamed to draft_from_ngrams everywhere.",
}


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def prompts(workload: str, streams: int) -> list[str]:
    text = WORKLOADS[workload].format(file=GROUNDED_FILE.read_text())
    return [chat(text)] * streams


def run_flashserve(a) -> dict:
    from flashserve import LLM, SamplingParams

    method, _, variant = a.config.partition("-")
    spec = None
    if method == "ngram":
        spec = {"method": "ngram"}
    elif method == "draft":
        spec = {"method": "draft_model", "model": a.draft}
    elif method in ("medusa", "eagle"):
        spec = {"method": method, "model": getattr(a, method)}
    if spec is not None:
        spec.update(num_speculative_tokens=a.k, adaptive=variant != "pinned")
        if variant == "typical":
            spec["acceptance"] = "typical"
    llm = LLM(a.model, speculative_config=spec, max_model_len=2048, enable_prefix_caching=False)
    params = SamplingParams(temperature=a.temperature, seed=0, max_tokens=a.max_tokens)
    llm.generate(prompts("open", 1), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    before = llm.engine.get_stats()
    t0 = time.perf_counter()
    outs = llm.generate(prompts(a.workload, a.streams), params, use_tqdm=False)
    dt = time.perf_counter() - t0
    after = llm.engine.get_stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    return {"tok_s": tokens / dt, "tokens": tokens, "drafted": drafted, "accepted": accepted}


def llamacpp_draft_model(path: str, k: int, threads: int):
    """A LlamaDraftModel that runs a smaller model in a llama.cpp context of its own: k greedy tokens
    after the target's tokens, its KV cache kept over their common prefix from call to call."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaDraftModel

    class DraftModel(LlamaDraftModel):
        def __init__(self):
            self.llm = Llama(path, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)

        def _next(self) -> int:
            return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

        def __call__(self, input_ids, **kwargs):
            d, ids = self.llm, input_ids.tolist()
            have = d.input_ids[: d.n_tokens].tolist()
            common = next((i for i, (x, y) in enumerate(zip(have, ids)) if x != y), min(len(have), len(ids)))
            d.n_tokens = min(common, len(ids) - 1)  # eval drops the cache past n_tokens; the last token gives logits
            d.eval(ids[d.n_tokens:])
            drafts = [self._next()]
            for _ in range(k - 1):
                d.eval(drafts[-1:])
                drafts.append(self._next())
            return np.array(drafts, dtype=np.intc)

    return DraftModel()


def run_llamacpp(a) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from flashserve.model.catalogue import resolve

    draft = None
    if a.config == "lookup":
        draft = LlamaPromptLookupDecoding(num_pred_tokens=a.k)
    elif a.config == "draft":
        draft = llamacpp_draft_model(str(resolve(a.draft)), a.k, a.threads)
    # verifying drafts takes every position's logits, which Llama keeps only with logits_all
    llm = Llama(str(resolve(a.model)), n_ctx=4096, n_threads=a.threads, n_threads_batch=a.threads, verbose=False,
                draft_model=draft, logits_all=draft is not None)
    llm(prompts("open", 1)[0], max_tokens=8, temperature=0)  # warm-up
    t0 = time.perf_counter()
    out = llm(prompts(a.workload, 1)[0], max_tokens=a.max_tokens, temperature=0)
    dt = time.perf_counter() - t0
    tokens = out["usage"]["completion_tokens"]
    return {"tok_s": tokens / dt, "tokens": tokens}


def one_run(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    result = run_llamacpp(a) if a.engine == "llamacpp" else run_flashserve(a)
    print("RESULT " + json.dumps(result), flush=True)


SPECULATIVE = ("ngram", "draft", "medusa", "eagle")
CONFIGS = [("flashserve", "plain"),
           *(("flashserve", m + variant) for m in SPECULATIVE for variant in ("", "-pinned", "-typical")),
           ("llamacpp", "plain"), ("llamacpp", "lookup"), ("llamacpp", "draft")]
DEFAULT_CONFIGS = "flashserve:plain,flashserve:ngram,flashserve:draft,llamacpp:plain,llamacpp:lookup,llamacpp:draft"


def spawn(a, engine: str, config: str, workload: str, streams: int) -> dict:
    cmd = [sys.executable, __file__, "--one", "--engine", engine, "--config", config, "--workload", workload,
           "--streams", str(streams), "--model", a.model, "--draft", a.draft, "--k", str(a.k),
           "--max-tokens", str(a.max_tokens), "--threads", str(a.threads), "--temperature", str(a.temperature),
           "--medusa", str(a.medusa), "--eagle", str(a.eagle)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{engine} {config} {workload} x{streams} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--k", type=int, default=4, help="tokens proposed per step")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0, help="flashserve only (seed 0); llama.cpp runs greedy")
    ap.add_argument("--workloads", default="open,grounded")
    ap.add_argument("--medusa", default=None, help="Medusa heads file (for the flashserve:medusa configuration)")
    ap.add_argument("--eagle", default=None, help="EAGLE layer file (for the flashserve:eagle configuration)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"engine:config pairs to run, of {', '.join(e + ':' + c for e, c in CONFIGS)}")
    # one measurement in this process (what the driver spawns)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        a.streams = int(a.streams)
        return one_run(a)

    wanted = [tuple(c.split(":")) for c in a.configs.split(",")]
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}")
    for c in ("medusa", "eagle"):
        if any(w[0] == "flashserve" and w[1].partition("-")[0] == c for w in wanted) and getattr(a, c) is None:
            ap.error(f"flashserve:{c} needs --{c} HEADS_FILE")
    header("Speculative decoding: flashserve and llama.cpp", model=a.model, draft=a.draft,
           k=a.k, max_tokens=a.max_tokens, threads=a.threads, temperature=a.temperature, repeats=a.repeats,
           configs=a.configs, medusa=a.medusa, eagle=a.eagle)
    for streams in [int(s) for s in a.streams.split(",")]:
        for workload in a.workloads.split(","):
            configs = [c for c in CONFIGS if c in wanted and (streams == 1 or c[0] == "flashserve")]
            runs: dict[tuple, list[dict]] = {c: [] for c in configs}
            ratios: dict[tuple, list[float]] = {c: [] for c in configs}
            for r in range(a.repeats):
                order = configs if r % 2 == 0 else configs[::-1]  # alternate, and flip the order each round
                got = {}
                for engine, config in order:
                    print(f"[{time.strftime('%H:%M:%S')}] {workload} x{streams}: {engine} {config}, round {r + 1}",
                          file=sys.stderr, flush=True)
                    got[(engine, config)] = spawn(a, engine, config, workload, streams)
                base = got[("llamacpp", "plain") if ("llamacpp", "plain") in got else ("flashserve", "plain")]
                for c in configs:
                    runs[c].append(got[c])
                    ratios[c].append(got[c]["tok_s"] / base["tok_s"])
            base_name = "llama.cpp plain" if ("llamacpp", "plain") in configs else "flashserve plain"
            print(f"\n### {workload}, {streams} stream(s)\n")
            print(f"| engine | tok/s | / {base_name} | accepted / drafted | tokens |")
            print("|---|---|---|---|---|")
            for c in configs:
                rs = runs[c]
                drafted = sum(x.get("drafted", 0) for x in rs)
                accepted = sum(x.get("accepted", 0) for x in rs)
                acc = f"{accepted}/{drafted} = {accepted / drafted:.2f}" if drafted else "-"
                print(f"| {c[0]} {c[1]} | {fmt([x['tok_s'] for x in rs])} | {fmt(ratios[c])} | {acc} | "
                      f"{rs[-1]['tokens']} |")


if __name__ == "__main__":
    main()
