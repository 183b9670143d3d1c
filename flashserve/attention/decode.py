"""Flash-Decoding (Dao et al. 2023, "Flash-Decoding for long-context inference"):
every decode row of the batch at once, the KV length cut into splits whose partial
softmaxes are merged by log-sum-exp, so one long context never means one huge score
tensor and the splits are independent work.

    partial over split s:  m_s = max score, l_s = sum exp(score - m_s), o_s = sum exp(score - m_s) v
    merged:                m = max_s m_s,  o = sum_s exp(m_s - m) o_s / sum_s exp(m_s - m) l_s
"""
from __future__ import annotations

import torch

from flashserve.kernels import ops

SPLIT_TOKENS = 512


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, max_seq_len: int, min_seq_len: int, scale: float,
                     sliding_window: int | None = None, logit_softcap: float | None = None) -> torch.Tensor:
    """q: (N, Hq, D) one query per sequence; block_table: (N, max_blocks); seq_lens: (N,) → (N, Hq, D).
    max_seq_len / min_seq_len are host-side bounds of seq_lens (planning without a device sync).

    On CPU the C++ kernel reads K/V in place through the block table; elsewhere (or without a
    compiler) its torch twin computes the same thing (kernels/ops.py chooses)."""
    return ops.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, max_seq_len, min_seq_len, scale,
                                      sliding_window, logit_softcap, SPLIT_TOKENS)
