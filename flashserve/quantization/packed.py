"""Weights packed for quantized CPU kernels, each an nn.Module mapping x (..., K) → (..., N).

    GroupQuantWeight  this project's C++ kernel (kernels/csrc/quant_matmul.cpp): w = q * s + z per
                 group along K, 4-bit or 5-bit codes (groups of 32) or 8-bit codes, s and z float32;
                 x and y float32. Exact for GGUF's Q4_0/Q4_1/Q4_K/Q5_0/Q8_0. The default when the C++
                 build works. s and z are float16 where that is exact (the file's own d and m), so
                 Q4_0/Q4_1 take 5 bits per weight, Q5_0 5.5 and Q8_0 8.5, as in the file; Q4_K 4.625
                 (its own 6-bit integers and float16 factors: a factored table, below).
    Int4Weight   torch.ops.aten._weight_int4pack_mm_for_cpu:  w = (q - 8) * s + z, q in 0..15, one
                 (s, z) per group of 32 along K; codes packed by _convert_weight_to_int4pack_for_cpu,
                 scales_and_zeros (K/32, N, 2) in bfloat16. 5 bits per weight.
    Int8Weight   torch.ops.aten._weight_int8pack_mm:  w = q * s_n, q int8 (N, K), s (N,) bfloat16.
                 8 bits per weight (+16 per row).
    Int8GroupWeight  the same kernel once per group of 32 along K (Q8_0's form), for embeddings.
    DenseWeight  F.linear on a float weight, for parts no kernel takes.
    RowSegments  several of the above stacked along N (a merged q|k|v whose parts differ in type).
    PermutedInput  x's columns gathered into another order before one of the above (GPTQ act-order).

torch's two kernels (the fallback without a C++ compiler) require the activation, the scales and
the output in one dtype, and only their bfloat16 paths are vectorized: x is rounded to bfloat16
and the output comes back as bfloat16, whatever the compute dtype.

Per-shape choice. The kernels are GEMV-style: their cost grows linearly with M, while MKL's
float32 GEMM amortizes the weight over the rows. From M >= large_m rows the weight is instead
dequantized to float32 in chunks of rows and multiplied with torch.mm; x is rounded as the
kernel would, so both paths give the same numbers up to float32 summation order. µs per call,
2 threads, x float32, weights cycled beyond L3, SmolLM2-135M shapes, this project's 2-core AMD
EPYC VM (AVX2 only: no AVX-512 is exposed, so no native bf16 either), quiet machine,
benchmarks/linear_kernels.py --threads 2:

    gate_up 3072x576   M:     1     4    16    32    64   128    512
      float32 F.linear      637  1186  1182  1439  2595  3550  12002
      torch int4 kernel     154   209   771  1555  4343  6786      -
      own 4-bit kernel      148   228   864  1791  4851  7102  28118
      own 4-bit dequant+mm    -     -  1671  3313  3575  4773  16799
      own 8-bit kernel      116   171   667  1403  2722  5328  22965
    lm_head 49152x576  M:     1     4    16    32    64   128    512
      torch int8 per group 3965  7397 39881 61211     -     -      -
      own 8-bit kernel     1787  2953 13000 22492 54330 86888 404006
      torch int8 dequant+mm   -     - 44033 45138 59791 104939 289288

Crossovers: own 4-bit 64 rows, own 8-bit 128 (torch's: int4 128, int8 64, per-group head 32).
Float32 GEMM beats every kernel from M ~ 32, but the weight is not kept in float32: that is
5-6x the memory of the 4-bit form.

With int8 activations (quantization="auto", the default) the table above does not apply: the own
kernel's integer GEMMs (quant_matmul.cpp; a tiled one from 16-24 rows) beat dequantize + float32
GEMM at every M measured (M=512, 2 threads: gate_up 7.8 vs 12.1 ms, down 5.8 vs 6.6, qkv 3.9 vs
4.3), so GroupQuantWeight never leaves the kernel then (large_m = sys.maxsize).
"""
from __future__ import annotations

import functools
import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.kernels import ops

logger = logging.getLogger(__name__)

GROUP = 32
_CHUNK_ROWS = 4096  # rows dequantized at a time on the large-M path (multiple of 64)
_KERNEL_DTYPE = torch.bfloat16


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class PackedWeight(nn.Module):
    in_features: int
    out_features: int
    act_dtype = _KERNEL_DTYPE  # what kernel() takes; the large-M path rounds x to it too
    kernel_dtype = _KERNEL_DTYPE  # what kernel() returns; the large-M path rounds to it too
    large_m = 64  # rows from which dequantize + float32 GEMM beats the kernel (table above)
    chunk_rows = _CHUNK_ROWS  # rows dequantized at a time on the large-M path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= self.large_m and self.can_dequantize():
            y = self._dense_matmul(x2)
        else:
            y = self.kernel(x2.to(self.act_dtype).contiguous())
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, K) bfloat16 → (M, N) bfloat16."""
        raise NotImplementedError

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows [start, end) of the weight as float32 (rows, K), exactly what the kernel multiplies."""
        raise NotImplementedError

    def can_dequantize(self) -> bool:
        return True

    def _dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(self.act_dtype).float()  # (M, K) the kernel's rounding of x
        if self.out_features <= self.chunk_rows:  # one chunk: no copy into a preallocated output
            return (xf @ self.dequantize().t()).to(self.kernel_dtype)
        out = torch.empty(x.shape[0], self.out_features, dtype=self.kernel_dtype)  # (M, N)
        for start in range(0, self.out_features, self.chunk_rows):
            end = min(start + self.chunk_rows, self.out_features)
            out[:, start:end] = xf @ self.dequantize(start, end).t()
        return out


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
            for c in codes.split(_CHUNK_ROWS)
        ]))  # (N, K/2) uint8, torch's layout
        self.scales_and_zeros = _param(
            torch.stack([scale.t(), zero.t()], dim=-1).to(_KERNEL_DTYPE).contiguous()
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
        self.scale = _param(scale.to(_KERNEL_DTYPE))  # (N,)

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
        self.kernel_scale = _param(self.scale.data.to(_KERNEL_DTYPE))  # (K/32, N) for the kernel

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


class GroupQuantWeight(PackedWeight):
    """w = q * s + z per group of `group` values along K, q of 4, 5 or 8 bits, s and z float32 (or
    float16 where exact):
    the exact form of GGUF's Q4_0/Q4_1/Q4_K (4-bit), Q5_0 (5-bit) and Q8_0 (8-bit) blocks, run by this
    project's C++ kernel (kernels/csrc/quant_matmul.cpp) on float32 activations, so neither x
    nor the output is rounded to bfloat16 and each row's result does not depend on M.
    With int8_activations (quantization="auto") the kernel rounds x per group of 32 to int8 and
    computes every M itself (no large-M path), so a row's result never depends on its step.
    Also an embedding table: rows() looks rows up exactly."""

    act_dtype = torch.float32
    kernel_dtype = torch.float32
    # The C++ dequantization is cheap enough to run per L2-sized chunk, so the GEMM reads each
    # chunk's float32 rows from L2 (gate_up at M=512: ~13.3 -> ~12.8 ms, 2 threads; noisy host).
    chunk_rows = 256

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group: int = GROUP, int8_activations: bool = False, packed: bool = False):
        """codes (N, K): uint8 in 0..15 (bits 4, group 32) or int8 (bits 8); scale, zero (N, K/group).
        packed: codes already in the kernel's layout (quant_matmul.cpp): 4-bit (N, K/2) (GGUF's Q4_0/Q4_1
        bytes), 5-bit (N, K/32 * 20) (Q5_0's blocks without d; always packed).
        int8_activations: round x per group of 32 to int8 and take integer dot products (group 32 only)."""
        super().__init__()
        per_byte = {4: 2.0, 5: GROUP / 20, 8: 1.0}[bits] if packed else 1.0
        n, k = codes.shape[0], round(codes.shape[1] * per_byte)
        if (bits not in (4, 5, 8) or k % group or table_shape(scale) != (n, k // group) or (bits != 8 and group != GROUP)
                or (bits == 5 and not packed)):
            raise ValueError(f"{bits}-bit weight: codes {tuple(codes.shape)}, scale {tuple(scale.shape)}")
        self.out_features, self.in_features = n, k
        self.bits, self.group = bits, group
        self.set_int8_activations(int8_activations)
        if bits == 8:
            codes = codes.to(torch.int8).view(torch.uint8)
        elif not packed:  # byte j of a group: code j (low nibble) and code j + 16 (high), as in GGUF
            halves = codes.to(torch.uint8).view(n, k // GROUP, 2, GROUP // 2)
            codes = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2)
        self.codes = _param(codes.contiguous())  # (N, K/2), (N, K/32 * 20) or (N, K) uint8
        self.scale = _param(_narrowest_exact(scale))  # (N, K/group) float, or factored (table_values)
        self.zero = None if zero is None else _param(_narrowest_exact(zero))  # as scale

    def set_int8_activations(self, on: bool) -> None:
        """The kernel rounds x to int8 only for groups of 32; other groups keep float x."""
        self.int8_activations = on and self.group == GROUP
        # Rows from which dequantize + float32 GEMM is faster (module docstring): never with int8
        # activations, so a row's result is the same in a prompt of any length as in a decode step.
        self.large_m = sys.maxsize if self.int8_activations else 64 if self.bits == 4 else 128

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_quant_matmul(x, self.codes, self.scale, self.zero, self.bits, self.group,
                                      self.int8_activations)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        stop = self.out_features if end is None else min(end, self.out_features)
        w = ops.group_dequantize(self.codes, self.scale, self.zero, self.bits, self.group, start, stop)
        return self._weights(slice(start, end)) if w is None else w

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding lookup: (T,) ids → (T, K) in `dtype`, exactly q * s + z."""
        return self._weights(ids).to(dtype)

    def int_codes(self, index=slice(None)) -> torch.Tensor:
        """The codes q of rows `index` as integers (rows, K/group, group), unpacked from the layout."""
        c = self.codes[index]  # (rows, code bytes per row)
        if self.bits == 8:
            return c.view(torch.int8).view(len(c), -1, self.group).to(torch.int32)
        if self.bits == 4:
            c = c.view(len(c), -1, GROUP // 2)
            return torch.cat([c & 0x0F, c >> 4], dim=-1).to(torch.int32)  # (rows, K/32, 32)
        c = c.view(len(c), -1, 20)  # 5-bit: nibbles as above, then bit j of a u32 is bit 4 of code j
        low = torch.cat([c[..., :16] & 0x0F, c[..., :16] >> 4], dim=-1).to(torch.int32)
        high = (c[..., 16:].to(torch.int32)[..., :, None] >> torch.arange(8)) & 1  # (rows, K/32, 4, 8)
        return (low | (high.flatten(-2) << 4)) - 16

    def _weights(self, index) -> torch.Tensor:
        q = self.int_codes(index).float()  # (rows, K/group, group)
        rows = len(q)
        w = q.mul_(table_values(self.scale[index])[..., None])
        if self.zero is not None:
            w.add_(table_values(self.zero[index])[..., None])
        return w.view(rows, self.in_features)

    def scale_values(self) -> torch.Tensor:
        """s as float32 (N, K/group), whatever form the kernel holds it in."""
        return table_values(self.scale)

    def zero_values(self) -> torch.Tensor | None:
        return None if self.zero is None else table_values(self.zero)


class DenseWeight(PackedWeight):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.weight = _param(w.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.weight[start:end].float()

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding lookup: (T,) ids → (T, K) in `dtype`."""
        return self.weight[ids].to(dtype)


class PermutedInput(PackedWeight):
    """x gathered into the column order `order` before the inner weight: a weight whose groups hold
    scattered input columns (a GPTQ act-order checkpoint) runs as one whose groups are consecutive."""

    def __init__(self, order: torch.Tensor, inner: PackedWeight):
        super().__init__()
        self.inner = inner
        self.order = _param(order.to(torch.int64))  # (K,) checkpoint column of the inner weight's column j
        self.in_features, self.out_features = inner.in_features, inner.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.order))

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        inner = self.inner.dequantize(start, end)  # (rows, K), columns in the inner order
        w = torch.empty_like(inner)
        w[:, self.order] = inner
        return w


class RowSegments(PackedWeight):
    """Weights stacked along N, each run by its own kernel; outputs concatenated."""

    def __init__(self, parts: list[PackedWeight]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return torch.cat([p.dequantize() for p in self.parts])[start:end]


# --- per-group tables (the kernel's scales and zeros) ---------------------------------------------
# A table holds one value per (row, group): float32, float16, or factored. A factored table is a
# K-quant's own form, value = integer (one byte per group) * float16 factor per super-block of 8
# groups (Q4_K: s = d * sc, z = -dmin * mn, exact in float32), stored per row as the K/G bytes and
# then the K/(8G) float16 factors: uint8 (N, K/G + K/(4G)). Rows slice like any table's.

SUPER_GROUPS = 8  # groups per factor in a factored table (a K-quant's 256-value super-block)


def factored_table(ints: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """ints (N, G) in 0..255, factors (N, G/8) float16 → the factored table (N, G + G/4) uint8."""
    n, g = ints.shape
    if g % SUPER_GROUPS or factors.shape != (n, g // SUPER_GROUPS) or factors.dtype != torch.float16:
        raise ValueError(f"factored table: ints {tuple(ints.shape)}, factors {tuple(factors.shape)} {factors.dtype}")
    return torch.cat([ints.to(torch.uint8), factors.contiguous().view(torch.uint8)], dim=1).contiguous()


def table_shape(t: torch.Tensor) -> tuple[int, int]:
    """(N, groups) of a table in any form."""
    return (t.shape[0], t.shape[1] * 4 // 5) if t.dtype == torch.uint8 else tuple(t.shape)


def table_values(t: torch.Tensor) -> torch.Tensor:
    """A table's values as float32 (N, groups); a factored table's products are exact in float32."""
    if t.dtype != torch.uint8:
        return t.float()
    n, g = table_shape(t)
    ints, factors = t[:, :g].float(), t[:, g:].contiguous().view(torch.float16).float()  # (N, G), (N, G/8)
    return (ints.view(n, -1, SUPER_GROUPS) * factors[..., None]).view(n, g)


def _narrowest_exact(t: torch.Tensor) -> torch.Tensor:
    """float16 when it holds every value exactly (GGUF's own d and m are float16: Q4_0, Q4_1, Q5_0 and
    Q8_0 scales, Q4_1 zeros), else float32 (requantized groups); a factored table as it is."""
    if t.dtype == torch.uint8:
        return t.contiguous()
    t = t.float().contiguous()
    half = t.half()
    return half if torch.equal(half.float(), t) else t


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
    return up.to(torch.int32).view(torch.float32).to(_KERNEL_DTYPE)


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
