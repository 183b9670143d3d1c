"""The torch twins of the C++ kernels (kernels/csrc): the same computation in plain torch ops, run
where the kernels do not apply (another device, an unsupported layout, a failed build) and compared
with them by the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dimension, statistics in float32 (Zhang & Sennrich 2019)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (Su et al. 2021) of q (T, Hq, D) and k (T, Hk, D); cos, sin (positions, D/2)."""
    c = cos[positions].unsqueeze(1)  # (T, 1, D/2)
    s = sin[positions].unsqueeze(1)
    return _rotate(q, c, s), _rotate(k, c, s)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def act_and_mul(gate_up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    """act(gate) * up on (..., 2d) = [gate | up]: SiLU (SwiGLU, Shazeer 2020) or tanh-GELU (GeGLU)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") if gelu_tanh else F.silu(gate)) * up


def write_kv_slots(rows: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """rows (T, H, D) → slots (T,) of a cache side (blocks, block_size, H, D) in any layout."""
    if cache.is_contiguous():
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, rows.to(cache.dtype))
    else:
        block_size = cache.shape[1]
        cache[slot_mapping // block_size, slot_mapping % block_size] = rows.to(cache.dtype)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, min_seq_len: int,
                           scale: float, sliding_window: int | None = None,
                           logit_softcap: float | None = None, split_tokens: int = 512) -> torch.Tensor:
    """Flash-Decoding (attention/decode.py) in plain torch ops: batched matmuls over gathered
    blocks, `split_tokens` keys per split."""
    N, Hq, D = q.shape
    block_size, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    qg = q.reshape(N, Hk, G, D)  # (N, Hk, G, D): query heads grouped under their KV head, no K/V repeat
    last = (seq_lens.long() - 1).view(N, 1, 1, 1)  # position of each query
    blocks_per_split = max(1, split_tokens // block_size)
    num_blocks = -(-max_seq_len // block_size)
    first_block = 0
    if sliding_window is not None:  # blocks wholly outside every row's window need not be read
        first_block = max(0, (min_seq_len - sliding_window) // block_size)

    m = l = acc = None
    for b0 in range(first_block, num_blocks, blocks_per_split):
        b1 = min(b0 + blocks_per_split, num_blocks)
        ids = block_table[:, b0:b1].reshape(-1).long()  # (N * nb,)
        # index_select gathers whole blocks ~10x faster than advanced indexing on CPU
        k = k_cache.index_select(0, ids).view(N, -1, Hk, D).to(q.dtype)  # (N, L, Hk, D), read as q's dtype
        v = v_cache.index_select(0, ids).view(N, -1, Hk, D).to(q.dtype)
        s = torch.matmul(qg, k.permute(0, 2, 3, 1)).float() * scale  # (N, Hk, G, L)
        if logit_softcap:
            s = logit_softcap * torch.tanh(s / logit_softcap)
        pos = torch.arange(b0 * block_size, b1 * block_size, device=q.device).view(1, 1, 1, -1)
        beyond = pos > last  # (N, 1, 1, L): past the row's length, maybe never written (garbage, NaN too)
        invalid = beyond if sliding_window is None else beyond | (pos <= last - sliding_window)
        s = s.masked_fill(invalid, float("-inf"))
        # m stays -inf for a row that sees nothing in this split; exponents use a finite
        # stand-in so that row contributes exp(-inf) = 0 instead of NaN, and a later
        # split's (possibly very negative) max is never compared against a fake 0.
        m_s = s.amax(-1, keepdim=True)  # (N, Hk, G, 1)
        p = torch.exp(s - finite_max(m_s))
        l_s = p.sum(-1, keepdim=True)
        # p is 0 past the length, but 0 * NaN = NaN: the gathered copy of V is zeroed there first.
        v.masked_fill_(beyond.view(N, -1, 1, 1), 0)
        o_s = torch.matmul(p.to(v.dtype), v.permute(0, 2, 1, 3)).float()  # (N, Hk, G, D)
        m, l, acc = merge_partials((m, l, acc), (m_s, l_s, o_s))
    return (acc / l).to(q.dtype).reshape(N, Hq, D)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def merge_partials(run, part):
    """Online softmax (Milakov & Gimelshein 2018): the running (max, sum of exp, weighted values) of the
    keys so far merged with one more split's; `run` is (None, None, None) before the first split."""
    m, l, acc = run
    m_s, l_s, o_s = part
    if m is None:
        return part
    m_new = torch.maximum(m, m_s)
    a, b = torch.exp(m - finite_max(m_new)), torch.exp(m_s - finite_max(m_new))
    return m_new, l * a + l_s * b, acc * a + o_s * b


def finite_max(m: torch.Tensor) -> torch.Tensor:
    """A running max with -inf (row saw no key yet) replaced by 0, safe to subtract in exp()."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


# ---- prefill attention ----
Q_TILE = 256  # query rows per tile in the soft-capped path
KV_TILE = 256  # keys per tile in the soft-capped path


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor,
                      seq_len: int, scale: float, sliding_window: int | None = None,
                      logit_softcap: float | None = None) -> torch.Tensor:
    """q: (ql, Hq, D) for positions seq_len-ql .. seq_len-1; block_ids: the sequence's blocks → (ql, Hq, D).

    PyTorch's fused scaled_dot_product_attention CPU kernel (flash-style tiled online softmax,
    FlashAttention: Dao et al. 2022) on the gathered context; GQA through enable_gqa so K/V heads are
    never repeated. Logit soft-capping cannot be expressed in SDPA, so those layers go through
    `_tiled_softcap_attention`, a plain-torch version of the same tiling. With a sliding window only
    the blocks some query can see are gathered."""
    ql = q.shape[0]
    block_size = k_cache.shape[1]
    first_key = 0
    if sliding_window is not None:  # the earliest query (seq_len - ql) sees keys > its position - window
        first_key = max(0, seq_len - ql - sliding_window + 1) // block_size * block_size
    blocks = block_ids[first_key // block_size :]
    k = gather_context(k_cache, blocks, seq_len - first_key, q.dtype).transpose(0, 1)  # (Hk, L, D), key j at first_key + j
    v = gather_context(v_cache, blocks, seq_len - first_key, q.dtype).transpose(0, 1)
    qh = q.transpose(0, 1)  # (Hq, ql, D)
    if logit_softcap:
        out = _tiled_softcap_attention(qh, k, v, seq_len - ql - first_key, scale, sliding_window, logit_softcap)
    else:
        # A batch dimension of 1: with 3-D inputs SDPA's CPU dispatch takes its unfused math path
        # (bmm, softmax, mask copies); 4-D ones reach the flash kernel, 3.6x faster at 512 tokens
        # of SmolLM2's 9/3 heads (21 -> 5.8 ms a layer, measured).
        q4, k4, v4 = qh.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if ql == seq_len and sliding_window is None:  # fresh prompt: plain causal, SDPA's own mask
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)[0]
        else:
            mask = _visible(ql, k.shape[1], seq_len - ql - first_key, sliding_window, q.device)
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)[0]
    return out.transpose(0, 1)


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The first `length` tokens stored in `block_ids`: (length, Hk, D) in `dtype` (a float16 cache
    is read as the compute dtype). index_select copies whole blocks about 10x faster than
    advanced indexing on CPU."""
    return cache.index_select(0, block_ids).flatten(0, 1)[:length].to(dtype)


def _visible(num_q: int, num_k: int, q_offset: int, sliding_window: int | None, device,
             k_offset: int = 0) -> torch.Tensor:
    """(num_q, num_k) bool: query i at q_offset + i sees key j at k_offset + j (causal, optional window)."""
    q_pos = torch.arange(q_offset, q_offset + num_q, device=device)[:, None]
    k_pos = torch.arange(k_offset, k_offset + num_k, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def _tiled_softcap_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float,
                             sliding_window: int | None, softcap: float) -> torch.Tensor:
    """q: (Hq, ql, D) at positions q_offset..; k, v: (Hk, L, D) at positions 0.. → (Hq, ql, D).

    Online softmax over KV tiles (FlashAttention, Dao et al. 2022, Alg. 1) with scores
    capped as c * tanh(s / c) (Gemma 2). Query heads are grouped under their KV head by a
    reshape, so K/V are never repeated; tiles entirely above the causal diagonal or
    entirely left of the window are skipped.
    """
    Hq, ql, D = q.shape
    Hk, L = k.shape[0], k.shape[1]
    G = Hq // Hk
    qg = q.reshape(Hk, G, ql, D)
    out = torch.empty(Hk, G, ql, D, dtype=q.dtype, device=q.device)
    for q0 in range(0, ql, Q_TILE):
        q1 = min(q0 + Q_TILE, ql)
        qt = qg[:, :, q0:q1].reshape(Hk, G * (q1 - q0), D)  # (Hk, G*tq, D)
        k_lo = 0 if sliding_window is None else max(0, q_offset + q0 - sliding_window + 1)
        k_hi = q_offset + q1  # one past the last query's own position
        m = l = acc = None
        for k0 in range(k_lo, k_hi, KV_TILE):
            k1 = min(k0 + KV_TILE, k_hi)
            s = torch.matmul(qt, k[:, k0:k1].transpose(1, 2)).float() * scale  # (Hk, G*tq, tk)
            s = softcap * torch.tanh(s / softcap)
            s = s.view(Hk, G, q1 - q0, k1 - k0)
            keep = _visible(q1 - q0, k1 - k0, q_offset + q0, sliding_window, q.device, k_offset=k0)
            s = s.masked_fill(~keep, float("-inf"))
            m_t = s.amax(-1, keepdim=True)  # (Hk, G, tq, 1), -inf where a row sees nothing in the tile
            p = torch.exp(s - finite_max(m_t))
            l_t = p.sum(-1, keepdim=True)
            o_t = torch.matmul(p.view(Hk, -1, k1 - k0).to(v.dtype), v[:, k0:k1]).float().view(Hk, G, q1 - q0, D)
            m, l, acc = merge_partials((m, l, acc), (m_t, l_t, o_t))
        out[:, :, q0:q1] = (acc / l).to(q.dtype)
    return out.view(Hq, ql, D)
