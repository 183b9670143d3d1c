"""GGUF block types held exactly as 8-bit codes with per-group tables, w = c * s (+ z), for this
project's 8-bit kernel (GroupQuantWeight, bits=8): the float32 value c * s (+ z) equals what gguf-py's
dequantization (gguf/quants.py) computes, bit for bit (up to the sign of a zero).

Block layouts are ggml's (llama.cpp ggml/src/ggml-common.h, block_*; the element order is that of
dequantize_row_* in ggml-quants.c, which gguf-py follows). A float16 times an integer of at most
13 bits is exact in float32 (11 + 13 significant bits fit its 24): d * sc_j everywhere, Q5_1's d q
and Q5_K's (d sc_j) q. So where gguf-py computes (d * sc) * q and this form c * (d * sc') with
c sc' = q sc, both round the same real number once (and Q5_1/Q5_K add their zero with one rounding).

    Q8_0, Q5_0, Q4_0 (gguf_blocks.int8_groups)      c = the code, s = d                 group 32, 8.5 bits
    Q5_1    (24 B / 32):  d:f16, m:f16, qh:u32, qs[16]
            w = d q + m, q = nibble | bit of qh << 4    c = q, s = d, z = m         group 32, 9 bits
    Q5_K   (176 B / 256): d, dmin:f16, 8 x (6-bit sc, 6-bit mn) in 12 B, qh[32], qs[128]
            w = (d sc_j) q - dmin mn_j per 32           c = q, s = d * sc_j, z = -dmin * mn_j
                                                        (factored tables)           group 32, 8.625 bits
    Q6_K   (210 B / 256): ql[128], qh[64], int8 sc[16], d:f16
            w = (d sc_j) (q - 32) per 16                c = ±(q - 32), s = d * |sc_j|
                                                        (factored)                  group 16, 8.625 bits
    Q3_K   (110 B / 256): hmask[32], qs[64], 12 B of 6-bit sc, d:f16
            w = (d (sc_j - 32)) q per 16, q in -4..3    c = ±q, s = d * |sc_j - 32|
                                                        (factored)                  group 16, 8.625 bits
    IQ4_NL  (18 B / 32):  d:f16, qs[16]
            w = d kvalues[nibble]                       c = kvalues[nibble], s = d  group 32, 8.5 bits
    IQ4_XS (136 B / 256): d:f16, scales_h:u16, scales_l[4], qs[128]
            w = (d (ls_j - 32)) kvalues[nibble] per 32  c = ±kvalues[nibble], s = d * |ls_j - 32|
                                                        (factored)                  group 32, 8.3125 bits
    Q2_K    (84 B / 256): sc[16] (4-bit sc, 4-bit mn), qs[64], d, dmin:f16
            w = (d sc_j) q - dmin mn_j per 16, q 0..3   c = q, s = d * sc_j, z = -dmin * mn_j
                                                        (factored)                  group 16, 9.25 bits
    IQ3_*, IQ2_*, IQ1_*, TQ1_0, TQ2_0: gguf_codebook_forms.py

A factored table's integers are unsigned (group_quant_weight.factored_table), so a negative
per-group integer moves its sign into that group's codes: float rounding is symmetric, so
(d |sc|) (-c) = (d sc) c exactly. Q6_K's scales change every 16 values and no 8-bit code holds
(q - 32) sc_j, so it keeps groups of 16 (as do Q2_K, whose zeros change every 16 values, the codebook
types of 16, and Q3_K, whose 3-bit codes the 16-lane tiles keep at 3 bits: group_quant_weight.py, narrow
tiles), which the kernel runs with int8 activations too (quant_matmul.cpp). The tiles hold IQ4_NL's and
IQ4_XS's codes as 4-bit indices into their levels likewise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q

from flashserve.quantization import gguf_codebook_forms
from flashserve.quantization.gguf_bits import IQ4_LEVELS, crumbs, half, nibble_pairs, nibbles
from flashserve.quantization.gguf_blocks import INT8_GROUP_TYPES, GGUFTensor, _q4k_scale_min, int8_groups
from flashserve.quantization.group_quant_weight import SUPER_GROUPS, factored_table, table_values

GROUPS = {Q.Q8_0: 32, Q.Q5_0: 32, Q.Q4_0: 32, Q.Q5_1: 32, Q.Q5_K: 32, Q.Q6_K: 16, Q.Q3_K: 16,
          Q.IQ4_NL: 32, Q.IQ4_XS: 32, Q.Q2_K: 16} | {Q[name]: g for name, g in gguf_codebook_forms.GROUPS.items()}
EXACT_INT8_TYPES = frozenset(GROUPS)


@dataclass
class Int8Form:
    """codes (N, K) int8; scale and zero (N, K/group) tables (float, or factored uint8), zero optional."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group: int


def exact_int8(t: GGUFTensor) -> tuple[torch.Tensor, ...]:
    """(codes, scale) or (codes, scale, zero) of a tensor of EXACT_INT8_TYPES, groups of GROUPS[t.qtype]."""
    if t.qtype in INT8_GROUP_TYPES:
        return tuple(torch.from_numpy(a) for a in int8_groups(t))
    rows, cols = t.shape
    block, size = GGML_QUANT_SIZES[t.qtype]
    b = t.block_bytes().view(rows * cols // block, size)  # only read
    codes, *tables = _CONVERT[t.qtype](b)
    return (codes.reshape(rows, cols), *(_table(x, rows) for x in tables))


def _table(values, rows: int) -> torch.Tensor:
    """A table's rows from per-block values: float16 (blocks,), or (integers (blocks, groups), float16
    factor (blocks,)) of a 256-value super-block, 8 groups of 32 or 16 of 16: a factored table."""
    if isinstance(values, torch.Tensor):
        return values.reshape(rows, -1)
    ints, factor = values
    factors = factor[:, None].repeat(1, ints.shape[1] // SUPER_GROUPS)  # (blocks, 1 or 2)
    return factored_table(ints.reshape(rows, -1), factors.reshape(rows, -1))


def _signed_into_codes(codes: torch.Tensor, ints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (blocks, groups, group) times signed ints (blocks, groups) → codes carrying the sign, |ints|."""
    sign = torch.where(ints < 0, -1, 1).to(torch.int16)
    return (codes.to(torch.int16) * sign[..., None]).to(torch.int8), ints.to(torch.int16).abs()


def _q5_1(b: torch.Tensor):
    qh = b[:, 4:8].contiguous().view(torch.int32)  # (blocks, 1): bit j is bit 4 of element j
    high = (qh >> torch.arange(32, dtype=torch.int32)) & 1
    codes = (nibbles(b[:, 8:24]).to(torch.int32) | (high << 4)).to(torch.int8)
    return codes, half(b[:, 0:2]), half(b[:, 2:4])


def _q5_k(b: torch.Tensor):
    n = len(b)
    sc, mn = (torch.from_numpy(a.astype(np.uint8)) for a in _q4k_scale_min(b[:, 4:16].numpy()))  # (n, 8) each
    qs = b[:, 48:176].reshape(n, 4, 1, 32)  # chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high
    low = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32)
    high = torch.stack([(b[:, 16:48] >> j) & 1 for j in range(8)], dim=1)  # bit j of qh[l]: sub-block j
    codes = (low | (high << 4)).to(torch.int8)
    return codes, (sc, half(b[:, 0:2])), (mn, -half(b[:, 2:4]))


def _q6_k(b: torch.Tensor):
    n = len(b)
    ql = b[:, 0:128].reshape(n, 2, 1, 64)  # each half of 128 values: 64 low nibbles, then 64 high ones
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    high = crumbs(b[:, 128:192]).reshape(n, 8, 32)  # each half: bit pairs 0, 2, 4, 6 of qh[l] for its 4 x 32
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16)
    codes, ints = _signed_into_codes(q, b[:, 192:208].contiguous().view(torch.int8))
    return codes, (ints, half(b[:, 208:210]))


def _q3_k(b: torch.Tensor):
    n = len(b)
    low = crumbs(b[:, 32:96]).to(torch.int16)  # each half of 128 values: bit pairs 0, 2, 4, 6 of qs[l]
    hmask = b[:, 0:32].reshape(n, 1, 32)  # bit j of hmask[l]: element 32 j + l; a clear bit subtracts 4
    high = torch.cat([(hmask >> j) & 1 for j in range(8)], dim=1).reshape(n, 256).to(torch.int16)
    q = (low - 4 * (1 - high)).reshape(n, 16, 16)  # -4..3
    packed = b[:, 96:108]  # 16 6-bit scales: low 4 bits of j in byte j % 8 (j >= 8: its high nibble),
    lo = torch.cat([packed[:, 0:8] & 0x0F, packed[:, 0:8] >> 4], dim=1)  # high 2 in byte 8 + j % 4, bits 2 (j / 4)
    hi = torch.cat([(packed[:, 8:12] >> (2 * i)) & 3 for i in range(4)], dim=1)
    sc = (lo | (hi << 4)).to(torch.int16) - 32  # (n, 16)
    codes, ints = _signed_into_codes(q, sc)  # ±q: 3 bits again once the tiles move the sign back (narrow_tiles_)
    return codes, (ints, half(b[:, 108:110]))


def _q2_k(b: torch.Tensor):
    n = len(b)
    sc = b[:, 0:16]  # (n, 16): sc_j in the low nibble, mn_j in the high one
    return (crumbs(b[:, 16:80]).to(torch.int8).reshape(n, 16, 16), (sc & 0x0F, half(b[:, 80:82])),
            (sc >> 4, -half(b[:, 82:84])))


def _iq4_nl(b: torch.Tensor):
    return IQ4_LEVELS[nibbles(b[:, 2:18]).long()], half(b[:, 0:2])


def _iq4_xs(b: torch.Tensor):
    n = len(b)
    levels = IQ4_LEVELS[nibbles(b[:, 8:136].reshape(n, 8, 16)).long()]  # (n, 8, 32)
    scales_h = b[:, 2:4].contiguous().view(torch.int16).to(torch.int32)  # (n, 1): bits 2j, 2j + 1 → sub-block j
    lo = nibble_pairs(b[:, 4:8])  # sub-block j: nibble j % 2 of byte j / 2
    hi = (scales_h >> (2 * torch.arange(8, dtype=torch.int32))) & 3
    codes, ints = _signed_into_codes(levels, (lo.to(torch.int32) | (hi << 4)) - 32)
    return codes, (ints, half(b[:, 0:2]))


_CONVERT = {Q.Q5_1: _q5_1, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k, Q.Q3_K: _q3_k, Q.IQ4_NL: _iq4_nl, Q.IQ4_XS: _iq4_xs,
            Q.Q2_K: _q2_k} | {Q[name]: convert for name, convert in gguf_codebook_forms.CONVERT.items()}


# --- parts of one merged weight ------------------------------------------------------------------

def merged(forms: list[Int8Form]) -> Int8Form:
    """One form for parts stacked along the rows (q|k|v of different types), still exact: the smallest
    group, each table repeated to it, factored tables kept where every part has one (else float32 values,
    exact), absent zeros as zero."""
    group = min(f.group for f in forms)
    scale = _stacked([_regrouped(f.scale, f.group // group) for f in forms])
    zero = None
    if any(f.zero is not None for f in forms):
        zero = _stacked([_regrouped(f.zero if f.zero is not None else _zero_table(f.scale), f.group // group)
                         for f in forms])
    return Int8Form(torch.cat([f.codes for f in forms]), scale, zero, group)


def _regrouped(table: torch.Tensor, repeat: int) -> torch.Tensor:
    """Each group's value `repeat` times (a table for groups `repeat` times smaller)."""
    if repeat == 1:
        return table
    if table.dtype != torch.uint8:
        return table.repeat_interleave(repeat, dim=1)
    g = table.shape[1] * 4 // 5
    ints, factors = table[:, :g], table[:, g:].contiguous().view(torch.float16)
    return factored_table(ints.repeat_interleave(repeat, dim=1), factors.repeat_interleave(repeat, dim=1))


def _zero_table(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if like.dtype == torch.uint8 else torch.zeros(like.shape, dtype=torch.float16)


def _stacked(tables: list[torch.Tensor]) -> torch.Tensor:
    if all(t.dtype == torch.uint8 for t in tables):
        return torch.cat(tables)
    return torch.cat([table_values(t) for t in tables])
