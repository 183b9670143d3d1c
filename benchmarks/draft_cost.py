"""What one draft costs: engine step time with k drafts pinned against plain decoding.

    python benchmarks/draft_cost.py [--model smollm2-135m] [--method ngram] [--ks 1,2,4] [--repeats 2]
        [--streams 1] [--heads FILE] [--draft MODEL]

Each configuration (plain, and the method at each k with adaptive k off) runs in a process of its
own, alternated and reversed every round. A run times LLMEngine.step() over 160 greedy tokens per
stream of one prompt (after a 16-token warm-up) and reports ms per step and drafts per step. The cost
of a draft as a fraction of a plain step, c = (step ms / plain step ms - 1) / drafts per step, is what
spec_decode/draft_length.py weighs accepted tokens against.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import header

PROMPT = "Write a long story about a dragon who learns to cook. Once upon a time,"


def one_run(a) -> None:
    from flashserve.engine.arg_utils import EngineArgs
    from flashserve.engine.llm_engine import LLMEngine
    from flashserve.sampling_params import SamplingParams

    spec = None
    if a.k:
        spec = {"method": a.method, "num_speculative_tokens": a.k, "adaptive": False}
        if a.method in ("medusa", "eagle"):
            spec["model"] = a.heads
        elif a.method == "draft_model":
            spec["model"] = a.draft
    eng = LLMEngine.from_engine_args(EngineArgs(model=a.model, speculative_config=spec))

    def run(tokens: int) -> tuple[int, float]:
        for i in range(a.streams):
            eng.add_request(f"{tokens}-{i}", PROMPT, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
        steps, seconds = 0, 0.0
        while eng.has_unfinished_requests():
            t0 = time.perf_counter()
            eng.step()
            seconds += time.perf_counter() - t0
            steps += 1
        return steps, seconds

    run(16)
    before = eng.get_stats().spec_draft_tokens_total
    steps, seconds = run(160)
    drafted = eng.get_stats().spec_draft_tokens_total - before
    print("RESULT " + json.dumps({"ms": 1000 * seconds / steps, "drafts": drafted / steps}), flush=True)


def spawn(a, k: int) -> dict:
    cmd = [sys.executable, __file__, "--one", "--k", str(k), "--model", a.model, "--method", a.method,
           "--streams", str(a.streams), "--heads", str(a.heads), "--draft", str(a.draft)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"k={k} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="ngram", choices=("ngram", "draft_model", "medusa", "eagle"))
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--heads", default=None, help="heads file of medusa / eagle")
    ap.add_argument("--draft", default=None, help="the draft model of draft_model")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one_run(a)
    header("Cost of a draft", model=a.model, method=a.method, ks=a.ks, streams=a.streams, repeats=a.repeats)
    ks = [0] + [int(k) for k in a.ks.split(",")]
    runs: dict[int, list[dict]] = {k: [] for k in ks}
    for r in range(a.repeats):
        for k in ks if r % 2 == 0 else ks[::-1]:
            runs[k].append(spawn(a, k))
    plain = statistics.median(x["ms"] for x in runs[0])
    print("| k | ms per step | drafts per step | c per draft |\n|---|---|---|---|")
    for k in ks:
        ms = [x["ms"] for x in runs[k]]
        drafts = statistics.median(x["drafts"] for x in runs[k])
        cost = f"{(statistics.median(ms) / plain - 1) / drafts:.2f}" if k else "-"
        print(f"| {k or 'plain'} | {statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f}) | {drafts:.2f} | {cost} |")


if __name__ == "__main__":
    main()
