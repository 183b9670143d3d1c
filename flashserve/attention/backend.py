"""Paged attention entry point used by every attention layer.

Writes this step's K/V into the paged cache, then runs decode rows (query_len == 1)
together through Flash-Decoding and each prefill chunk through the tiled prefill kernel.
"""
from __future__ import annotations

import torch

from flashserve.attention.decode import decode_attention
from flashserve.attention import kv_quant
from flashserve.attention.metadata import AttentionMetadata
from flashserve.kernels import ops


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: (T, Hk, D) → cache slots slot_mapping (T,), in place."""
    kv_quant.write(k_cache, k, slot_mapping)
    kv_quant.write(v_cache, v, slot_mapping)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, logit_softcap: float | None = None) -> torch.Tensor:
    """q: (T, Hq, D); k, v: (T, Hk, D); caches (num_blocks, block_size, Hk, D) → (T, Hq, D)."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    if meta.is_pure_decode:
        return decode_attention(q, k_cache, v_cache, meta.block_table, meta.seq_lens, meta.max_seq_len,
                                min(meta.seq_lens_cpu), scale,
                                sliding_window, logit_softcap)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    decode_rows = [i for i, ql in enumerate(meta.query_lens_cpu) if ql == 1]
    starts = meta.query_start_loc_cpu
    for i, (ql, sl) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if ql == 1:
            continue
        blocks = meta.block_table[i, : -(-sl // block_size)]  # int32, as the kernel reads it
        out[starts[i] : starts[i + 1]] = ops.paged_prefill_attention(
            q[starts[i] : starts[i + 1]], k_cache, v_cache, blocks, sl, scale, sliding_window, logit_softcap
        )
    if decode_rows:
        rows = torch.tensor(decode_rows, device=q.device)
        token_rows = torch.tensor([starts[i] for i in decode_rows], device=q.device)
        seq_lens = meta.seq_lens[rows]
        out[token_rows] = decode_attention(
            q[token_rows], k_cache, v_cache, meta.block_table[rows], seq_lens,
            max(meta.seq_lens_cpu[i] for i in decode_rows), min(meta.seq_lens_cpu[i] for i in decode_rows),
            scale, sliding_window, logit_softcap,
        )
    return out
