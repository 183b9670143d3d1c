"""Where a speculative decoding round goes: the time of every runner step, by runner (the target's,
the draft model's) and by the rows the step computes, for one greedy stream of the spec_decode
benchmark's prompt.

    python benchmarks/spec_step_split.py [--model qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b] [--k 4]
        [--workload open] [--max-tokens 128]

Adaptive k is off (k drafts every round). `--k 0` runs plain decoding. Prints, per (runner, rows):
steps, total and median ms. The target's rows are 1 + k (its token and the drafts to verify), the
draft's 1, or 2 where it catches up on the target's token after all k drafts were accepted.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from spec_decode import prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--workload", default="open", choices=("open", "grounded"))
    ap.add_argument("--max-tokens", type=int, default=128)
    a = ap.parse_args()

    from flashserve import LLM, SamplingParams
    from flashserve.runner import model_runner

    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    execute = model_runner.ModelRunner.execute

    def timed(runner, sched):
        t0 = time.perf_counter()
        out = execute(runner, sched)
        rows = sum(r.num_scheduled_tokens for r in sched.scheduled)
        times["draft" if runner.decode_rows > 1 else "target", rows].append(time.perf_counter() - t0)
        return out

    model_runner.ModelRunner.execute = timed
    spec = ({"method": "draft_model", "model": a.draft, "num_speculative_tokens": a.k, "adaptive": False}
            if a.k else None)
    llm = LLM(a.model, speculative_config=spec, max_model_len=2048, enable_prefix_caching=False)
    llm.generate(prompts("open", 1), SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm-up
    times.clear()
    t0 = time.perf_counter()
    out = llm.generate(prompts(a.workload, 1), SamplingParams(temperature=0, max_tokens=a.max_tokens), use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = len(out[0].outputs[0].token_ids)
    print(f"{a.model}, draft {a.draft if a.k else '-'}, k = {a.k}: {tokens} tokens in {wall:.2f} s, "
          f"{tokens / wall:.2f} tok/s; runner steps {sum(map(sum, times.values())):.2f} s of it")
    print("| runner | rows | steps | total ms | median ms |\n|---|---|---|---|---|")
    for (runner, rows), ts in sorted(times.items()):
        print(f"| {runner} | {rows} | {len(ts)} | {1e3 * sum(ts):.0f} | {1e3 * statistics.median(ts):.1f} |")


if __name__ == "__main__":
    main()
