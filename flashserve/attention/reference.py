"""Plain paged attention, one sequence at a time with an explicit mask: the oracle for tests."""
from __future__ import annotations

import torch

from flashserve.attention.metadata import AttentionMetadata


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens stored in `block_ids`: (length, Hk, D)."""
    return cache[block_ids].reshape(-1, *cache.shape[2:])[:length]


def context_mask(query_len: int, seq_len: int, sliding_window: int | None, device) -> torch.Tensor:
    """(query_len, seq_len) bool: query row i sits at position seq_len - query_len + i."""
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window  # the window includes the token itself
    return mask


def paged_attention_reference(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                              sliding_window: int | None = None, logit_softcap: float | None = None) -> torch.Tensor:
    """q: (T, Hq, D), caches already holding this step's K/V → (T, Hq, D)."""
    block_size = k_cache.shape[1]
    starts = meta.query_start_loc.tolist()
    out = torch.empty_like(q)
    for i, (ql, sl) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        blocks = meta.block_table[i, : -(-sl // block_size)].long()
        k = gather_context(k_cache, blocks, sl).float()  # (sl, Hk, D)
        v = gather_context(v_cache, blocks, sl).float()
        qi = q[starts[i] : starts[i + 1]].float()  # (ql, Hq, D)
        group = qi.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, k) * scale
        if logit_softcap:
            scores = logit_softcap * torch.tanh(scores / logit_softcap)
        scores = scores.masked_fill(~context_mask(ql, sl, sliding_window, q.device), float("-inf"))
        out[starts[i] : starts[i + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
