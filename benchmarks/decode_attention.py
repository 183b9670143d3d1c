"""Paged decode attention, one layer: the C++ kernel beside the torch split-KV path (gather + bmm),
on SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64, block 16), scattered blocks.

    python benchmarks/decode_attention.py [--threads 2] [--dtype float32]

`--step` times one decode step's attention instead: every layer's own float16 cache (so the cache
is read from memory, as in the engine, not from a cache level that one layer would fit), 32
sequences of 192 tokens, on the attention shapes of the catalogue's models; median and spread of
`--repeats` steps.

    python benchmarks/decode_attention.py --step [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import header, set_threads, table

# name: (query heads, KV heads, head_dim, layers)
STEP_SHAPES = {"smollm2-135m": (9, 3, 64, 30), "qwen2.5-coder-1.5b": (12, 2, 128, 28), "gemma3-270m": (4, 1, 256, 18)}


def time_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def scattered_caches(n: int, length: int, hk: int, d: int, bs: int, dtype, count: int = 1):
    """`count` K/V cache pairs in the engine's layout holding n sequences of `length` tokens in randomly
    placed blocks."""
    from flashserve.kernels import ops

    per_seq = -(-length // bs)
    shape = (n * per_seq + 1, bs, hk, d)
    cpu = torch.device("cpu")
    caches = [(ops.kv_cache_empty(shape, dtype, cpu, keys=True).copy_(torch.randn(shape)),
               ops.kv_cache_empty(shape, dtype, cpu, keys=False).copy_(torch.randn(shape))) for _ in range(count)]
    num_blocks = shape[0]
    block_table = (torch.randperm(num_blocks - 1)[: n * per_seq] + 1).view(n, per_seq).int()
    return caches, block_table, torch.full((n,), length, dtype=torch.int32)


def one_layer(dtype) -> None:
    from flashserve.attention import decode
    from flashserve.kernels import reference

    hq, hk, d, bs = 9, 3, 64, 16
    header("Paged decode attention, one layer", shape=f"Hq {hq}, Hk {hk}, D {d}, block {bs}", dtype=str(dtype))
    rows = []
    for n, length in [(1, 100), (1, 1000), (1, 4000), (32, 200), (64, 256)]:
        ((k_cache, v_cache),), block_table, seq_lens = scattered_caches(n, length, hk, d, bs, dtype)
        q = torch.randn(n, hq, d, dtype=dtype)
        args_ = (q, k_cache, v_cache, block_table, seq_lens, length, length, d**-0.5)
        cpp = time_us(lambda: decode.decode_attention(*args_))
        ref = time_us(lambda: reference.paged_decode_attention(*args_, None, None, decode.SPLIT_TOKENS))
        kv_bytes = 2 * n * length * hk * d * k_cache.element_size()
        rows.append({"seqs": n, "context": length, "C++ µs": round(cpp), "torch µs": round(ref),
                     "torch / C++": round(ref / cpp, 1), "C++ GB/s of K/V": round(kv_bytes / cpp / 1e3, 1)})
    print(table(rows, list(rows[0])))


def whole_step(repeats: int, n: int = 32, length: int = 192, bs: int = 16) -> None:
    from flashserve.attention import decode

    header("Paged decode attention, one decode step (every layer's float16 cache)", sequences=n, context=length)
    rows = []
    for name, (hq, hk, d, layers) in STEP_SHAPES.items():
        caches, block_table, seq_lens = scattered_caches(n, length, hk, d, bs, torch.float16, layers)
        q = torch.randn(n, hq, d)

        def step():
            for k_cache, v_cache in caches:
                decode.decode_attention(q, k_cache, v_cache, block_table, seq_lens, length, length, d**-0.5)

        step()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        kv_bytes = 2 * n * length * hk * d * 2 * layers
        rows.append({"model shape": f"{name} ({hq}/{hk} heads, D {d}, {layers} layers)", "K/V MB": round(kv_bytes / 1e6),
                     "ms median": round(med * 1e3, 2), "ms min-max": f"{min(times) * 1e3:.2f}-{max(times) * 1e3:.2f}",
                     "GB/s of K/V": round(kv_bytes / med / 1e9, 1)})
        del caches
    print(table(rows, list(rows[0])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--step", action="store_true", help="one decode step's attention over every layer's cache")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    set_threads(args.threads)
    if args.step:
        whole_step(args.repeats)
    else:
        one_layer(getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
