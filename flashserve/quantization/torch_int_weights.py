"""Packed weights run by torch's own int4 and int8 CPU kernels: the fallback where the C++ build
(group_quant_weight.py) is missing. gguf_method.py and int4_method.py choose them; the interface
and the large-M path are packed.PackedWeight's.

    Int4Weight   torch.ops.aten._weight_int4pack_mm_for_cpu:  w = (q - 8) * s + z, q in 0..15, one
                 (s, z) per group of 32 along K; codes packed by _convert_weight_to_int4pack_for_cpu,
                 scales_and_zeros (K/32, N, 2) in bfloat16. 5 bits per weight.
    Int8Weight   torch.ops.aten._weight_int8pack_mm:  w = q * s_n, q int8 (N, K), s (N,) bfloat16.
                 8 bits per weight (+16 per row).
    Int8GroupWeight  the same kernel once per group of 32 along K (Q8_0's form), for embeddings.

torch's two kernels (the fallback without a C++ compiler) require the activation, the scales and
the output in one dtype, and only their bfloat16 paths are vectorized: x is rounded to bfloat16
and the output comes back as bfloat16, whatever the compute dtype.

Also here: the int8 codes of float weights (quantize_rows for Int8Weight, quantize_groups per group
of 32, for Int8GroupWeight and 8-bit GroupQuantWeight), and the layout torch packs int4 codes in.
"""
from __future__ import annotations

import functools
import logging

import torch

from flashserve.quantization.packed import CHUNK_ROWS, GROUP, KERNEL_DTYPE, PackedWeight, _param

logger = logging.getLogger(__name__)


class Int4Weight(PackedWeight):
    large_m = 128

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """codes (N, K) uint8 in 0..15; scale, zero (N, K/32) float: w = (codes - 8) * scale + zero."""
        super().__init__()
        n, k = codes.shape
        if k % GROUP or scale.shape != (n, k // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"int4 weight: codes {tuple(codes.shape)}, scale {tuple(scale.shape)}")
        self.out_features, self.in_features = n, k
        pad = -n % 16  # the kernel takes blocks of 16, 32, 48 or 64 rows
        if pad:
            codes = torch.cat([codes, torch.full((pad, k), 8, dtype=codes.dtype)])
            scale = torch.cat([scale, scale.new_zeros(pad, k // GROUP)])
            zero = torch.cat([zero, zero.new_zeros(pad, k // GROUP)])
        self.padded_rows = n + pad
        # Packed in chunks of rows: blocks of 64 rows are stored one after another, so the chunks
        # concatenate to the whole tensor's packing (and the int32 copy stays small).
        self.packed = _param(torch.cat([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.to(torch.int32).contiguous(), 1)
            for c in codes.split(CHUNK_ROWS)
        ]))  # (N, K/2) uint8, torch's layout
        self.scales_and_zeros = _param(
            torch.stack([scale.t(), zero.t()], dim=-1).to(KERNEL_DTYPE).contiguous()
        )  # (K/32, N, 2)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)
        return y[:, : self.out_features] if self.padded_rows != self.out_features else y

    def can_dequantize(self) -> bool:
        return _int4_layout() is not None

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.out_features if end is None else end
        rows = end - start
        codes = _unpack_int4(self.packed, self.padded_rows, self.in_features, start, end)  # (rows, K)
        sz = self.scales_and_zeros[:, start:end].float().permute(1, 0, 2)  # (rows, K/32, 2)
        scale, zero = sz[..., 0:1].contiguous(), sz[..., 1:2].contiguous()  # (rows, K/32, 1)
        w = codes.reshape(rows, -1, GROUP).float().sub_(8.0).mul_(scale).add_(zero)  # (q - 8) s + z
        return w.view(rows, self.in_features)


class Int8Weight(PackedWeight):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q (N, K) int8, scale (N,) exactly representable in bfloat16: w = q * scale."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.q = _param(q.contiguous())  # (N, K) int8
        self.scale = _param(scale.to(KERNEL_DTYPE))  # (N,)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        end = self.out_features if end is None else end
        return self.q[start:end].float() * self.scale[start:end, None].float()


class Int8GroupWeight(PackedWeight):
    """w = q * s per group of 32 along K (GGUF's Q8_0 form): an embedding table whose rows are
    looked up exactly (float32 scales) and whose tied LM head runs the int8 kernel once per
    group, with that group's scales as the kernel's per-row scales, summing in float32.
    Per-group calls cost little when N is large (the head: +5% over one per-row call, measured)
    and much when N is small, so layers use Int8Weight."""

    kernel_dtype = torch.float32  # the per-group partial products are summed in float32
    large_m = 32

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        """q (N, K) int8, scale (N, K/32) float."""
        super().__init__()
        n, k = q.shape
        self.out_features, self.in_features = n, k
        self.q = _param(q.view(n, k // GROUP, GROUP).transpose(0, 1).contiguous())  # (K/32, N, 32)
        self.scale = _param(scale.t().float().contiguous())  # (K/32, N) exact, for lookups
        self.kernel_scale = _param(self.scale.data.to(KERNEL_DTYPE))  # (K/32, N) for the kernel

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        xg = x.view(x.shape[0], -1, GROUP)  # (M, K/32, 32)
        out = torch.zeros(x.shape[0], self.out_features)  # (M, N) float32
        for g in range(xg.shape[1]):
            out += torch.ops.aten._weight_int8pack_mm(xg[:, g].contiguous(), self.q[g], self.kernel_scale[g])
        return out

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        w = self.q[:, start:end].float() * self.scale[:, start:end, None]  # (K/32, rows, 32)
        return w.transpose(0, 1).reshape(-1, self.in_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding lookup: (T,) ids → (T, K) in `dtype`, exactly q * s."""
        w = self.q[:, ids].float() * self.scale[:, ids, None]  # (K/32, T, 32)
        return w.transpose(0, 1).reshape(len(ids), self.in_features).to(dtype)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a float (N, K) weight → (q (N, K) int8, scale (N,) bfloat16).
    The scale is rounded *up* to bfloat16 so no code passes ±127; |Δw| <= scale / 2 ≈ max|w_row| / 254."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = _round_up_bf16(torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)))
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per group of 32 along K → (q (N, K) int8, scale (N, K/32) float32);
    |Δw| <= max|w_group| / 254."""
    n, k = w.shape
    wg = w.float().view(n, k // GROUP, GROUP)
    amax = wg.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(wg / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(n, k), scale


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """Smallest bfloat16 value >= x, for positive finite float32 x (bfloat16 is float32's top half)."""
    bits = x.float().view(torch.int32).to(torch.int64)
    up = ((bits + 0xFFFF) >> 16) << 16
    return up.to(torch.int32).view(torch.float32).to(KERNEL_DTYPE)


# --- the packed int4 layout --------------------------------------------------------------------
# _convert_weight_to_int4pack_for_cpu stores blocks of B rows (B = 64 with AVX-512, 32 otherwise)
# one after another, each as K runs of B/2 bytes. Within a full block, byte j of a run holds
# row j in its low nibble and row j + B/2 in its high nibble (on AVX-512 the bytes are
# interleaved so that this also holds); a last, shorter block and the non-vectorized build hold
# rows 2i, 2i + 1 in byte i. The layout depends on the CPU build torch dispatches to, so it is
# identified once by packing a probe; if no known layout matches, the large-M path is off.

_LAYOUTS = ((64, "halves"), (32, "halves"), (32, "pairs"))


@functools.cache
def _int4_layout() -> tuple[int, str] | None:
    gen = torch.Generator().manual_seed(0)
    n, k = 80, 64  # one full block of 64 or two of 32, and a short block
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for layout in _LAYOUTS:
        if torch.equal(_unpack_int4(packed, n, k, 0, n, layout).to(torch.int32), codes):
            return layout
    logger.warning("unknown int4 packing layout: quantized linears use the int4 kernel at every batch size")
    return None


def _unpack_int4(packed: torch.Tensor, n: int, k: int, start: int, end: int,
                 layout: tuple[int, str] | None = None) -> torch.Tensor:
    """Codes of rows [start, end) of a packed (n, K) weight as (rows, K) uint8."""
    block, kind = layout or _int4_layout()
    flat = packed.view(-1)
    first = start - start % block
    full_end = min(end + -end % block, n - n % block)  # rows [first, full_end) lie in full blocks
    parts = []
    if full_end > first:
        runs = flat[first * k // 2 : full_end * k // 2].view(-1, k, block // 2)  # (blocks, K, B/2) bytes
        lo, hi = runs & 0x0F, runs >> 4
        if kind == "halves":
            codes = torch.cat([lo, hi], dim=2)  # (blocks, K, B)
        else:
            codes = torch.stack([lo, hi], dim=3).view(-1, k, block)
        parts.append(codes.transpose(1, 2).reshape(-1, k))
    if end > full_end:  # the short last block
        tail = n - full_end
        run = flat[full_end * k // 2 : n * k // 2].view(k, tail // 2)
        parts.append(torch.stack([run & 0x0F, run >> 4], dim=2).view(k, tail).t())
    codes = torch.cat(parts) if len(parts) > 1 else parts[0]
    return codes[start - first : end - first]
