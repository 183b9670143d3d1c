"""Prefill attention: each sequence's new chunk attends to its cached prefix plus itself.

Uses PyTorch's fused scaled_dot_product_attention CPU kernel (flash-style tiled online
softmax, FlashAttention: Dao et al. 2022) on the gathered context; GQA through
enable_gqa so K/V heads are never repeated. Logit soft-capping cannot be expressed
in SDPA, so those layers take the explicit path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashserve.attention.reference import context_mask, gather_context


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                      seq_len: int, scale: float, sliding_window: int | None = None,
                      logit_softcap: float | None = None) -> torch.Tensor:
    """q: (ql, Hq, D) for positions seq_len-ql .. seq_len-1 → (ql, Hq, D)."""
    ql = q.shape[0]
    k = gather_context(k_cache, block_ids, seq_len).transpose(0, 1)  # (Hk, sl, D)
    v = gather_context(v_cache, block_ids, seq_len).transpose(0, 1)
    qh = q.transpose(0, 1)  # (Hq, ql, D)
    if logit_softcap:
        group = qh.shape[0] // k.shape[0]
        kf, vf = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
        s = torch.matmul(qh.float(), kf.transpose(1, 2)) * scale
        s = logit_softcap * torch.tanh(s / logit_softcap)
        s = s.masked_fill(~context_mask(ql, seq_len, sliding_window, q.device), float("-inf"))
        return torch.matmul(s.softmax(-1), vf).to(q.dtype).transpose(0, 1)
    if ql == seq_len and sliding_window is None:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = context_mask(ql, seq_len, sliding_window, q.device)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)
