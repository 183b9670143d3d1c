"""Paged decode attention, one layer: the C++ kernel beside the torch split-KV path (gather + bmm),
on SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head_dim 64, block 16), scattered blocks.

    python benchmarks/decode_attention.py [--threads 2] [--dtype float32]
"""
from __future__ import annotations

import argparse
import time

import torch

from common import header, set_threads, table


def time_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    from flashserve.attention import decode
    from flashserve.kernels import reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    set_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    hq, hk, d, bs = 9, 3, 64, 16
    header("Paged decode attention, one layer", shape=f"Hq {hq}, Hk {hk}, D {d}, block {bs}", dtype=args.dtype)
    rows = []
    for n, length in [(1, 100), (1, 1000), (1, 4000), (32, 200), (64, 256)]:
        per_seq = -(-length // bs)
        num_blocks = n * per_seq + 1
        k_cache = torch.randn(num_blocks, bs, hk, d, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        block_table = (torch.randperm(num_blocks - 1)[: n * per_seq] + 1).view(n, per_seq).int()
        seq_lens = torch.full((n,), length, dtype=torch.int32)
        q = torch.randn(n, hq, d, dtype=dtype)
        args_ = (q, k_cache, v_cache, block_table, seq_lens, length, length, d**-0.5)
        cpp = time_us(lambda: decode.decode_attention(*args_))
        ref = time_us(lambda: reference.paged_decode_attention(*args_, None, None, decode.SPLIT_TOKENS))
        kv_bytes = 2 * n * length * hk * d * k_cache.element_size()
        rows.append({"seqs": n, "context": length, "C++ µs": round(cpp), "torch µs": round(ref),
                     "torch / C++": round(ref / cpp, 1), "C++ GB/s of K/V": round(kv_bytes / cpp / 1e3, 1)})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
