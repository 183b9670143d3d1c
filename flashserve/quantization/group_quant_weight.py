"""GroupQuantWeight: w = q * s + z per group along K, run by this project's C++ kernel
(kernels/csrc/quant_matmul.cpp): 4-bit or 5-bit codes (groups of 32) or 8-bit codes, s and z
float32; x and y float32. Exact for GGUF's Q4_0/Q4_1/Q4_K/Q5_0/Q8_0. The default packed form when
the C++ build works (gguf_method.py, int4_method.py choose it). s and z are float16 where that is
exact (the file's own d and m), so Q4_0/Q4_1 take 5 bits per weight, Q5_0 5.5 and Q8_0 8.5, as in
the file; Q4_K 4.625 (its own 6-bit integers and float16 factors: a factored table, below).
"""
from __future__ import annotations

import mmap
import sys

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.heap import madvise
from flashserve.kernels import ops
from flashserve.quantization.gguf_bits import IQ4_LEVELS
from flashserve.quantization.packed import GROUP, PackedWeight, _param


class GroupQuantWeight(PackedWeight):
    """w = q * s + z per group of `group` values along K, q of 4, 5 or 8 bits, s and z float32 (or
    float16 where exact):
    the exact form of GGUF's Q4_0/Q4_1/Q4_K (4-bit), Q5_0 (5-bit) and Q8_0 (8-bit) blocks, run by this
    project's C++ kernel (kernels/csrc/quant_matmul.cpp) on float32 activations, so neither x
    nor the output is rounded to bfloat16 and each row's result does not depend on M.
    With int8_activations (quantization="auto") the kernel rounds x per 32 values to int8 (for
    groups of 32, and of 16 with 8-bit codes) and computes every M itself (no large-M path), so a
    row's result never depends on its step.
    Also an embedding table: rows() looks rows up exactly."""

    act_dtype = torch.float32
    kernel_dtype = torch.float32
    # codes and scale stored in the order of the kernel's 16-row tiles (to_wide_tiles), not by rows
    tiled = False
    # The C++ dequantization is cheap enough to run per L2-sized chunk, so the GEMM reads each
    # chunk's float32 rows from L2 (gate_up at M=512: ~13.3 -> ~12.8 ms, 2 threads; noisy host).
    chunk_rows = 256

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group: int = GROUP, int8_activations: bool = False, packed: bool = False):
        """codes (N, K): uint8 in 0..15 (bits 4, group 32) or int8 (bits 8); scale, zero (N, K/group).
        packed: codes already in the kernel's layout (quant_matmul.cpp): 4-bit (N, K/2) (GGUF's Q4_0/Q4_1
        bytes), 5-bit (N, K/32 * 20) (Q5_0's blocks without d; always packed).
        int8_activations: round x per 32 values to int8 and take integer dot products (int8_groups_fit)."""
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
        self.tile_factors = None  # stored in tiles, a factored scale's float16 factors (to_wide_tiles)
        self.tile_zero_factors = None  # and a factored zero's
        self.tile_levels = None  # stored in 4-bit tiles of indices, the 16 levels' codes + 128 (uint8)

    def set_int8_activations(self, on: bool) -> None:
        """The kernel rounds x to int8 where int8_groups_fit; other weights keep float x."""
        if self.tiled and not on:
            raise ValueError("a weight stored in tiles runs with int8 activations only")
        self.int8_activations = on and int8_groups_fit(self.bits, self.group, self.in_features)
        # Rows from which dequantize + float32 GEMM is faster (module docstring): never with int8
        # activations, so a row's result is the same in a prompt of any length as in a decode step.
        self.large_m = sys.maxsize if self.int8_activations else 64 if self.bits == 4 else 128

    def to_wide_tiles(self) -> bool:
        """Store the codes and scales in the order of the kernel's 16-row tiles, where the build has
        them (AVX-512): its tiled GEMM then reads each tile's group with plain loads, where row-major
        codes are transposed in registers at every call, and it runs every M, one row included. Only
        what that kernel takes: int8 activations; 8-bit codes in groups of 32 or 16 (in 6 or 2 bits where
        they fit), 5- and 4-bit ones; scales and zeros float, or a factored table's integers and factors.
        The same numbers either way. Returns whether it did. The codes are rearranged in their own
        storage where they can be (no second copy of a large head at start-up): a tensor shared with
        another weight must not be tiled."""
        lanes = ops.wide_tile_lanes()
        if self.tiled or not lanes or not self.int8_activations or self.codes.device.type != "cpu":
            return False
        n, spans, groups = self.out_features, self.in_features // GROUP, self.in_features // self.group
        tiles, pad = -(-n // lanes), -n % lanes
        if self.bits in (4, 5):  # the same bytes rearranged (nibble_tiles), in one pass
            self.codes = _param(ops.native().nibble_tiles(self.codes, self.bits))
        elif ops.native().two_bit_tiles_(self.codes):  # Q2_K's codes 0..3, now at the front of their storage
            self.codes = _param(_front_tiles(self.codes, tiles, spans, bits=2))
        else:
            codes = self.codes if not pad else F.pad(self.codes, (0, 0, 0, pad))  # padding rows: code 0, scale 0
            ops.native().rows_to_tiles_(codes)  # in place: a tile is the same bytes in either order
            self.codes = _param(codes.view(tiles, spans, lanes * GROUP))

        def tile_major(t: torch.Tensor) -> torch.Tensor:  # (N, per row) → (tiles, per row, lanes)
            return F.pad(t, (0, 0, 0, pad)).view(tiles, lanes, -1).transpose(1, 2).contiguous()

        def tiled_table(t: torch.Tensor) -> tuple[nn.Parameter, nn.Parameter | None]:
            if t.dtype == torch.uint8:  # factored: integers and factors apart, as the rows hold them
                return _param(tile_major(t[:, :groups])), _param(tile_major(t[:, groups:].contiguous().view(torch.float16)))
            return _param(tile_major(t)), None

        self.scale, self.tile_factors = tiled_table(self.scale)
        if self.zero is not None:
            self.zero, self.tile_zero_factors = tiled_table(self.zero)
        self.tiled = True
        narrowed = (_narrow_tiles(self.codes, self.scale, self.group, n) if self.codes.shape[2] == SPAN_BYTES[8]
                    else None)
        if narrowed is not None:
            codes, scale, levels = narrowed
            self.codes, self.scale = _param(codes), _param(scale)
            self.tile_levels = None if levels is None else _param(levels)
        return True

    def plan_part(self) -> tuple:
        """What the C++ decode step calls kernel with (kernels/csrc/decode_plan.cpp, PackedPart)."""
        return (self.codes, self.scale, self.zero, self.bits, self.group, self.int8_activations, self.tiled,
                self.tile_factors, self.out_features, self.tile_zero_factors, self.tile_levels, None)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled:
            return ops.group_quant_matmul_tiles(x, self.codes, self.scale, self.tile_factors, self.out_features,
                                                self.zero, self.tile_zero_factors, self.tile_levels)
        return ops.group_quant_matmul(x, self.codes, self.scale, self.zero, self.bits, self.group,
                                      self.int8_activations)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        stop = self.out_features if end is None else min(end, self.out_features)
        w = None if self.tiled else ops.group_dequantize(self.codes, self.scale, self.zero, self.bits, self.group,
                                                         start, stop)
        return self._weights(slice(start, end)) if w is None else w

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Embedding lookup: (T,) ids → (T, K) in `dtype`, exactly q * s + z."""
        return self._weights(ids).to(dtype)

    def int_codes(self, index=slice(None)) -> torch.Tensor:
        """The codes q of rows `index` as integers (rows, K/group, group), unpacked from the layout."""
        if self.tiled:
            tile, lane = self._tile_lanes(index)
            c = self.codes
            if c.shape[2] != SPAN_BYTES[8]:  # narrow tiles: only the ones asked for, widened
                used, tile = tile.unique(return_inverse=True)
                c = _eight_bit_tiles(c[used], self.tile_levels)
            tiles, spans, _ = c.shape
            c = c.view(tiles, spans, GROUP // 4, -1, 4)[tile, :, :, lane, :]  # (rows, K/32, 8, 4)
            return (c ^ 0x80).view(torch.int8).reshape(len(tile), -1, self.group).to(torch.int32)
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

    def _tile_lanes(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        """The tile and lane of each row of `index`, when stored in tiles."""
        if isinstance(index, slice):
            rows = torch.arange(*index.indices(self.out_features))
        else:  # row ids (an embedding lookup): no range over the whole vocabulary
            rows = torch.as_tensor(index).reshape(-1)
        lanes = self.scale.shape[2]
        return rows // lanes, rows % lanes

    def _scales(self, index) -> torch.Tensor:
        """s of rows `index` as float32 (rows, K/group)."""
        return self._table(self.scale, self.tile_factors, index)

    def _zeros(self, index) -> torch.Tensor:
        """z of rows `index` as float32 (rows, K/group); there is one."""
        return self._table(self.zero, self.tile_zero_factors, index)

    def _table(self, table: torch.Tensor, tile_factors: torch.Tensor | None, index) -> torch.Tensor:
        if self.tiled:
            tile, lane = self._tile_lanes(index)
            s = table[tile, :, lane].float()
            if tile_factors is None:
                return s
            return s.mul_(tile_factors[tile, :, lane].float().repeat_interleave(SUPER_GROUPS, dim=1))
        return table_values(table[index])

    def _weights(self, index) -> torch.Tensor:
        q = self.int_codes(index).float()  # (rows, K/group, group)
        rows = len(q)
        w = q.mul_(self._scales(index)[..., None])
        if self.zero is not None:
            w.add_(self._zeros(index)[..., None])
        return w.view(rows, self.in_features)

    def scale_values(self) -> torch.Tensor:
        """s as float32 (N, K/group), whatever form the kernel holds it in."""
        return self._scales(slice(None))

    def zero_values(self) -> torch.Tensor | None:
        return None if self.zero is None else self._zeros(slice(None))


def int8_groups_fit(bits: int, group: int, in_features: int) -> bool:
    """Whether the kernel takes int8 activations for this weight: groups of 32, or 8-bit codes in
    groups of 16 (Q6_K, Q2_K, ...) on rows of whole 32-value spans, x being rounded per 32 values."""
    return group == GROUP or (bits == 8 and group == 16 and in_features % GROUP == 0)


# --- narrow tiles -----------------------------------------------------------------------------------
# Codes of fewer bits take fewer of the 8-bit tiles' bytes: per span of a tile, the bytes u = c' + offset
# of its eight vectors w[q] (lane-major, 64 bytes each) as four vectors of nibbles (w[j]'s low 4 bits |
# w[j + 4]'s << 4; all of a 4-bit tile), then for 5 bits one vector of single bits (w[q]'s bit 4 at bit
# q), for 6 bits two of 2-bit fields (w[j + 2r]'s top 2 bits at bits 2r of vector j); a 2-bit tile is
# only two vectors of 2-bit fields (w[q] at bits 2 (q // 2) of vector q % 2), a 3-bit tile those two
# (the low 2 bits) and then one vector of single bits (w[q]'s bit 2 at bit q). The kernel's
# unpack_*_bit_span reads them. 4- and 5-bit weights (Q4_*, Q5_0) go from their rows (nibble_tiles),
# codes 0..3 (Q2_K) are rewritten in place (two_bit_tiles_), and 8-bit tiles whose codes fit in 3 or 6
# bits (Q3_K's c = ±q, q in -4..3, and Q6_K's c = ±(q - 32), each with the sign of the group's scale) too
# (narrow_tiles_): a group whose codes reach +4 (+32) has its sign moved from the codes to its scale
# (c' = -c, s' = -s: the same products, float rounding being symmetric), so every group's c' lies in
# -4..3 (-32..31); factored integers become int8. A weight of at most 16 distinct codes (the codebook
# types' signed grid values: IQ2_*'s ±8, ±25, ±43, IQ3_XXS's ±4..±62, IQ1_M's ±1, ±7, ±9), and codes
# that are IQ4_NL's and IQ4_XS's 16 non-uniform levels (or, IQ4_XS's, their negatives), become 4-bit
# tiles of indices (level_tiles_), a sign moved likewise, and the kernel looks each index's code up
# (tile_levels: level + 128).

OFFSET = {6: 32, 5: 16, 4: 0, 3: 4, 2: 0}  # u = c' + offset (quant_matmul.cpp: tile_code_offset)
SPAN_BYTES = {bits: 16 * GROUP * bits // 8 for bits in (8, 6, 5, 4, 3, 2)}  # a span of a 16-lane tile


def _narrow_tiles(codes: torch.Tensor, scale: torch.Tensor, group: int,
                  rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """8-bit tiles (T, K/32, 512) of `rows` rows with scales (T, K/G, 16) → the narrowest that holds every
    group's codes: 3-bit tiles, 4-bit indices into the weight's own values (at most 16 distinct: IQ2_*,
    IQ3_XXS, IQ1_M) or into IQ4's levels, or 6-bit tiles; their scales (int8 integers where factored)
    and the levels' codes + 128 for the indices (else None); or None when no width fits. The
    kernels write the narrow tiles over the front of the 8-bit ones' storage (narrow_tiles_,
    level_tiles_), and the rest's pages are handed back: no second copy of a large head at start-up."""
    factored = scale.dtype == torch.uint8
    ints = scale if factored else None
    native = ops.native()
    own = native.code_levels(codes, rows)  # a codebook type's few values, if they are few
    tables = [IQ4_LEVELS] if own is None else [torch.cat([own, own[-1:].expand(16 - len(own))]), IQ4_LEVELS]
    for bits, levels in [(3, None), *((4, table) for table in tables), (6, None)]:
        sign = (native.narrow_tiles_(codes, ints, group, bits) if levels is None else
                native.level_tiles_(codes, ints, group, levels, rows))
        if sign is not None:
            break
    else:
        return None
    tiles, spans, _ = codes.shape
    packed = _front_tiles(codes, tiles, spans, bits=bits)
    new_scale = (scale.to(torch.int16) * sign).to(torch.int8) if factored else scale * sign.to(scale.dtype)
    level_codes = None if levels is None else (levels.to(torch.int16) + 128).to(torch.uint8)
    return packed, new_scale, level_codes


def _front_tiles(written: torch.Tensor, tiles: int, spans: int, bits: int) -> torch.Tensor:
    """The `bits`-bit tiles an in-place packer wrote at the front of `written`'s storage, as (T, K/32, span
    bytes); the pages of the rest are handed back to the system (they read as zeros if touched again)."""
    flat = written.view(-1)
    used = tiles * spans * SPAN_BYTES[bits]
    page = mmap.PAGESIZE
    begin = -(-(flat.data_ptr() + used) // page) * page
    end = (flat.data_ptr() + flat.numel()) // page * page
    if end > begin:
        madvise(begin, end - begin, mmap.MADV_DONTNEED)
    return flat[:used].view(tiles, spans, SPAN_BYTES[bits])


def _eight_bit_tiles(packed: torch.Tensor, levels: torch.Tensor | None = None) -> torch.Tensor:
    """6-, 5-, 4-, 3- or 2-bit tiles (t, K/32, 384, 320, 256, 192 or 128) → the 8-bit tiles' bytes c + 128 of the
    same codes; `levels`: 4-bit indices into them (their codes + 128)."""
    t, spans, span_bytes = packed.shape
    bits = span_bytes * 8 // (16 * GROUP)
    p = packed.view(t, spans, bits, -1)
    if bits in (2, 3):  # w[q]'s low 2 bits in bits 2 (q // 2) of vector q % 2; for 3 bits its third at bit q of vector 2
        u = torch.cat([(p[:, :, q % 2] >> (2 * (q // 2)))[:, :, None] & 3 for q in range(8)], dim=2)
        if bits == 3:
            u = u | torch.cat([((p[:, :, 2] >> q) & 1)[:, :, None] << 2 for q in range(8)], dim=2)
        return (u.to(torch.int16) - OFFSET[bits] + 128).to(torch.uint8).view(t, spans, -1)
    nibbles, top_bits = p[:, :, :4], p[:, :, 4:]
    low = torch.cat([nibbles & 15, nibbles >> 4], dim=2)  # w[0..3], w[4..7]
    if bits == 4:
        if levels is not None:
            return levels[low.long()].view(t, spans, -1)
        return (low.to(torch.int16) + 128).to(torch.uint8).view(t, spans, -1)
    if bits == 6:
        top = torch.cat([(top_bits >> (2 * r)) & 3 for r in range(4)], dim=2)  # w[0, 1], w[2, 3], ...
    else:
        top = torch.cat([(top_bits >> q) & 1 for q in range(8)], dim=2)  # w[0], w[1], ...
    u = low | (top << 4)
    return (u.to(torch.int16) - OFFSET[bits] + 128).to(torch.uint8).view(t, spans, -1)


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

