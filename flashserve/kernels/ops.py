"""The one seam between Python and the C++ kernels (kernels/csrc).

Each op runs the C++ kernel when it applies — a CPU tensor in the layout the kernel takes, and a
build that loaded (kernels/build.py) — and its torch twin (kernels/reference.py) otherwise. That
choice is made here and nowhere else; callers never ask which path ran.
"""
from __future__ import annotations

import torch

from flashserve.kernels import reference
from flashserve.kernels.build import cpu_kernels


def _kernels_for(t: torch.Tensor):
    return cpu_kernels() if t.device.type == "cpu" else None


def available() -> bool:
    """Whether the C++ kernels loaded: the quantized weight forms and the decode plan exist only then."""
    return cpu_kernels() is not None


def native():
    """The compiled module itself, for the parts with no torch twin (the C++ decode step and the
    quantized matmuls); None when it did not build."""
    return cpu_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernels = _kernels_for(x)
    if kernels is not None and x.dim() in (2, 3) and x.stride(-1) == 1:
        return kernels.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); may write the sum into `residual`."""
    kernels = _kernels_for(x)
    if kernels is not None and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
        residual = residual.clone() if residual._base is not None else residual  # never write into a view
        return kernels.add_rms_norm_(x, residual, weight, eps), residual
    return reference.add_rms_norm(x, residual, weight, eps)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k); may rotate them in place."""
    kernels = _kernels_for(q)
    if kernels is not None and q.stride(-1) == 1 and k.stride(-1) == 1:
        kernels.rotary_(q, positions, cos, sin)
        kernels.rotary_(k, positions, cos, sin)
        return q, k
    return reference.rotary(positions, q, k, cos, sin)


def act_and_mul(gate_up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    kernels = _kernels_for(gate_up)
    if kernels is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return kernels.act_and_mul(gate_up, gelu_tanh)
    return reference.act_and_mul(gate_up, gelu_tanh)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits (M, V) -> (M,) int64 indices of each row's maximum, as torch.argmax(dim=-1) picks them.
    torch's CPU argmax reduces a row on one thread at a few GB/s: a 32-row greedy step's took
    longer than its attention for one layer."""
    kernels = _kernels_for(logits)
    if kernels is not None and logits.dim() == 2 and logits.dtype == torch.float32 and logits.is_contiguous() \
            and logits.shape[1] > 0:
        return kernels.argmax_rows(logits)
    return reference.argmax_rows(logits)


def kv_cache_empty(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                   keys: bool) -> torch.Tensor:
    """One side of a layer's paged cache, shape (num_blocks, block_size, heads, head_dim), not written.
    For the C++ kernels each block holds a head's tokens together: V as rows (heads, block_size,
    head_dim) and K transposed (heads, head_dim, block_size), so that the attention kernels find a
    block's keys in the lanes of one vector per dimension. The shape stays the same, only the strides
    differ: every torch reader indexes it as before."""
    num_blocks, block_size, heads, head_dim = shape
    if device.type != "cpu" or cpu_kernels() is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if keys:
        return torch.empty(num_blocks, heads, head_dim, block_size, dtype=dtype, device=device).permute(0, 3, 1, 2)
    return torch.empty(num_blocks, heads, block_size, head_dim, dtype=dtype, device=device).permute(0, 2, 1, 3)


def write_kv_slots(rows: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """rows (T, H, D) → slots slot_mapping (T,) of one cache side, in place, rounded to its dtype."""
    kernels = _kernels_for(cache)
    if kernels is not None and rows.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and cache.dtype in (torch.float32, torch.float16, torch.bfloat16):
        kernels.write_kv_slots(rows, cache, slot_mapping)
    else:
        reference.write_kv_slots(rows, cache, slot_mapping)


def paged_decode_attention(q: torch.Tensor, k_cache, v_cache, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           max_seq_len: int, min_seq_len: int, scale: float, sliding_window: int | None,
                           logit_softcap: float | None, split_tokens: int) -> torch.Tensor:
    """Flash-Decoding over the paged cache. The kernel reads a cache that is a plain tensor in place;
    an int8 cache (attention/kv_quant.py, not a tensor) is dequantized block by block by the twin."""
    kernels = _kernels_for(q)
    if kernels is not None and isinstance(k_cache, torch.Tensor):
        return kernels.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale,
                                              sliding_window or -1, logit_softcap or 0.0, split_tokens)
    return reference.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, max_seq_len, min_seq_len,
                                            scale, sliding_window, logit_softcap, split_tokens)


def paged_prefill_attention(q: torch.Tensor, k_cache, v_cache, block_ids: torch.Tensor, seq_len: int, scale: float,
                            sliding_window: int | None, logit_softcap: float | None) -> torch.Tensor:
    """One sequence's chunk q (ql, Hq, D) at positions seq_len - ql .. against its blocks' keys. The kernel
    reads a plain-tensor cache in place; an int8 cache (attention/kv_quant.py) goes to the twin, which
    gathers and dequantizes the context."""
    kernels = _kernels_for(q)
    if kernels is not None and isinstance(k_cache, torch.Tensor):
        return kernels.paged_prefill_attention(q, k_cache, v_cache, block_ids, seq_len, scale, sliding_window or -1,
                                               logit_softcap or 0.0)
    return reference.paged_prefill_attention(q, k_cache, v_cache, block_ids, seq_len, scale, sliding_window,
                                             logit_softcap)


def group_quant_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bits: int, group: int, int8_activations: bool) -> torch.Tensor:
    """x @ W^T for W = q * s + z per group (quant_matmul.cpp). The packed form exists only where the
    kernels built (quantization/gguf_method.py asks `available()` first), so there is no twin here."""
    return cpu_kernels().group_quant_matmul(x, codes, scale, zero, bits, group, int8_activations)


def group_quant_matmul_tiles(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, factors: torch.Tensor | None,
                             n: int, zero: torch.Tensor | None = None,
                             zero_factors: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T for codes and tables stored in the tiled GEMM's own order (quant_matmul.cpp), the
    scales (and zeros) float, or integers times their factors; 4-bit codes may be indices into 16
    levels (uint8, level + 128). Stored so only where wide_tile_lanes() says the build has those tiles."""
    return cpu_kernels().group_quant_matmul_tiles(x, codes, scale, factors, n, zero, zero_factors, levels)


def codebook_matmul_tiles(x: torch.Tensor, tiles: torch.Tensor, d: torch.Tensor, side: torch.Tensor, grid: torch.Tensor,
                          codes: torch.Tensor, qtype: str, n: int) -> torch.Tensor:
    """x @ W^T for i-quant weights (IQ1_S .. IQ3_S) in codebook tiles, at their own bits
    (quantization/codebook_weight.py), int8 activations. Only where wide_tile_lanes() says the build has the tiles."""
    return cpu_kernels().codebook_matmul_tiles(x, tiles, d, side, grid, codes, qtype, n)


def wide_tile_lanes() -> int:
    """Output rows per tile of the build's stored-tile GEMM (16 with AVX-512), 0 when it has none."""
    kernels = cpu_kernels()
    return 0 if kernels is None else kernels.wide_tile_lanes()


def group_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
                     start: int, end: int) -> torch.Tensor | None:
    """Rows [start, end) of W as float32, or None off the CPU (the caller unpacks in torch)."""
    kernels = _kernels_for(codes)
    if kernels is None:
        return None
    return kernels.group_dequantize(codes, scale, zero, bits, group, start, end)
