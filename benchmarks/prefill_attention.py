"""Prefill attention, one layer of one prompt: the C++ kernel (kernels/csrc/prefill_attention.cpp) beside
its torch twin (the context gathered, then torch's SDPA CPU flash kernel), on the attention shapes of the
catalogue's models, a float16 cache in scattered 16-token blocks, causal (Gemma 3 with its 512-token
window). The two are called in turn, `--repeats` rounds; median and min-max of each, the ratio of the
medians, and the kernel's GFLOP/s on the causal work (2 x 2 x D per visible query-key pair and head).

    python benchmarks/prefill_attention.py [--lengths 128,512,2048] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import header, set_threads, table
from decode_attention import STEP_SHAPES, scattered_caches

WINDOWS = {"gemma3-270m": 512}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def causal_flops(hq: int, d: int, length: int, window: int | None) -> float:
    pairs = sum(min(i + 1, window or i + 1) for i in range(length))
    return 4.0 * d * hq * pairs


def main() -> None:
    from flashserve.kernels import ops, reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="128,512,2048")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    set_threads(args.threads)
    header("Prefill attention, one layer of one prompt (float16 cache, float32 queries)", repeats=args.repeats)
    rows = []
    for name, (hq, hk, d, _) in STEP_SHAPES.items():
        window = WINDOWS.get(name)
        for length in (int(v) for v in args.lengths.split(",")):
            blocks = -(-length // 16)
            (k_cache, v_cache), = scattered_caches(1, length, hk, d, 16, torch.float16)[0]  # the engine's layout
            block_ids = torch.randperm(blocks + 1)[:blocks]
            q = torch.randn(length, hq, d)
            call = (q, k_cache, v_cache, block_ids, length, d**-0.5, window, None)
            kernel = lambda: ops.paged_prefill_attention(*call)  # noqa: E731
            twin = lambda: reference.paged_prefill_attention(*call)  # noqa: E731
            for fn in (kernel, twin):
                fn()
            times = {"C++": [], "torch": []}
            for _ in range(args.repeats):
                times["C++"].append(timed(kernel))
                times["torch"].append(timed(twin))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "model shape": f"{name} ({hq}/{hk} heads, D {d}{f', window {window}' if window else ''})",
                "tokens": length,
                "C++ ms": f"{med['C++'] * 1e3:.2f} ({min(times['C++']) * 1e3:.2f}-{max(times['C++']) * 1e3:.2f})",
                "torch ms": f"{med['torch'] * 1e3:.2f} ({min(times['torch']) * 1e3:.2f}-{max(times['torch']) * 1e3:.2f})",
                "torch / C++": round(med["torch"] / med["C++"], 2),
                "C++ GFLOP/s": round(causal_flops(hq, d, length, window) / med["C++"] / 1e9),
            })
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
