"""Milliseconds per decode step of the engine, without prefill: `--seqs` one-token prompts, after two
warm-up generations, then `--steps` steps timed; with `--time-head`, also the LM head's own calls
(median and minimum over the timed ones, per row count). For A/B of two builds: run it from each
checkout in turn, several times, in separate processes (RESULTS.md says how each figure was taken).

    python benchmarks/decode_steps.py --model gemma3-270m --seqs 32 --steps 96 --time-head
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--time-head", action="store_true", help="time the LM head's calls too")
    a = ap.parse_args()

    from flashserve import LLM, SamplingParams

    llm = LLM(model=a.model, max_num_seqs=a.seqs, max_model_len=1024)
    head_times: dict[int, list[float]] = {}
    if a.time_head:
        head = llm.engine.runner.model.head_weight()
        kernel = head.kernel

        def timed(x):
            t0 = time.perf_counter()
            y = kernel(x)
            head_times.setdefault(x.shape[0], []).append(time.perf_counter() - t0)
            return y

        head.kernel = timed
    prompts = [[100 + i] for i in range(a.seqs)]
    for n in (4, 8):  # warm-up: first calls, caches, allocator
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    head_times.clear()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=a.steps, ignore_eos=True), use_tqdm=False)
    step = (time.perf_counter() - t0) / a.steps
    print(f"{a.model} seqs={a.seqs}: {step * 1e3:.2f} ms a step, {a.seqs / step:.1f} tok/s")
    for rows, ts in sorted(head_times.items()):
        print(f"  head, {rows} rows: median {statistics.median(ts) * 1e3:.2f} ms, min {min(ts) * 1e3:.2f} "
              f"({len(ts)} calls)")


if __name__ == "__main__":
    main()
