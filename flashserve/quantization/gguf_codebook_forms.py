"""The i-quants built on codebooks (IQ3_*, IQ2_*, IQ1_*) and the ternary types (TQ1_0, TQ2_0) as
exact 8-bit codes with per-group scales (the forms gguf_int8_forms.py describes): float32 c * s equals
gguf-py's dequantization (gguf/quants.py) bit for bit.

Block layouts are ggml's (llama.cpp ggml/src/ggml-common.h, block_iq*/block_tq*; element order as in
dequantize_row_* of ggml-quants.c, which gguf-py follows). The codebooks ("grids": each index names 4
or 8 small integers) and the 128 sign patterns are gguf-py's tables, read, not copied. Each value is
a sub-block scale times a grid integer (and a sign), so the code is that signed grid integer and the
scale the sub-block's, computed as gguf-py computes it; the product rounds the same real number once.

    IQ2_XXS  (66 B / 256): d, 8 x (4 grid bytes, u32: 4 x 7-bit sign index, 4-bit ls)
             w = d (ls + 1/2) / 4 · ±grid, grid in {8, 25, 43}             group 32
    IQ2_XS   (74 B / 256): d, 32 x u16 (9-bit grid index, 7-bit sign index), 8 x 2 nibbles ls
             w = d (ls + 1/2) / 4 · ±grid per 16                           group 16
    IQ2_S    (82 B / 256): d, 32 grid bytes, 32 sign bytes, 8 qh (2 high index bits each), 8 x 2 ls
             as IQ2_XS with a 10-bit index                                 group 16
    IQ3_XXS  (98 B / 256): d, 64 grid bytes (4 values each), 8 x u32 (4 x 7-bit sign index, 4-bit ls)
             w = d (ls + 1/2) / 2 · ±grid, grid in {4, 12, ..., 62}        group 32
    IQ3_S   (110 B / 256): d, 64 grid bytes, 8 qh (9th index bit), 32 sign bytes, 4 x 2 nibbles ls
             w = d (2 ls + 1) · ±grid, grid odd in 1..15                   group 32 (factored tables)
    IQ1_S    (50 B / 256): d, 32 grid bytes, 8 x u16 (4 x 3 high index bits, 3-bit ls, delta sign)
             w = d (2 ls + 1) (grid ± 1/8), grid in {-1, 0, 1}:  c = 8 grid ± 1, s = d (2 ls + 1) / 8
                                                                           group 32
    IQ1_M    (56 B / 256): 32 grid bytes, 16 qh (per 8 values: 3 high index bits, delta sign),
             4 x u16 (4 x 3-bit ls; their top nibbles together are d)
             as IQ1_S with ls per 16 and the delta's sign per 8             group 16
    TQ2_0    (66 B / 256): 64 bytes of 2-bit q, d         w = d (q - 1)    group 32 (d repeated)
    TQ1_0    (54 B / 256): 48 + 4 bytes of base-3 digits, d   w = d (q - 1)  group 32 (d repeated)

The scales of the types whose factor is d / 4, d / 2 or d / 8 are float32 tables (a float16 factor
d / 8 would round for small d); IQ3_S's are d times an integer, held factored.

Where the build has the 16-lane tiles (AVX-512), linears of IQ1_*, IQ2_* and IQ3_* keep the file's blocks
instead (codebook_weight.py, the numbers of these forms). Elsewhere (and for TQ* everywhere), in linears,
the types whose codes within a group of 32 are affine in a 4-bit integer, c = step q + low
(IQ3_S: odd -15..15; IQ1_S: 8 g + delta, delta fixed per sub-block; TQ*: -1..1), take the 4-bit
kernel's form instead (affine4): w = (step s) q + low s, both tables exact in float32 (step, |low| and
q of at most 5 bits times a scale of at most 17), and the sum rounds the same real number c s once.
6 bits a weight instead of 8.3-9, and int8 activations.
"""
from __future__ import annotations

from functools import cache

import torch
from gguf import quants

from flashserve.quantization.gguf_bits import crumbs, half, nibble_pairs, u16, u32
from flashserve.quantization.group_quant_weight import table_values

_BITS = torch.arange(8, dtype=torch.uint8)


@cache
def grid(name: str) -> torch.Tensor:
    """gguf-py's codebook of `name` as (entries, 4 or 8) int16 integers."""
    kind = getattr(quants, name)
    kind.init_grid()
    return torch.from_numpy(kind.grid.reshape(kind.grid.shape[-2:])).to(torch.int16)


@cache
def _sign_patterns() -> torch.Tensor:
    """The 128 sign bytes (ksigns: 7 sign bits and an even-parity eighth) gguf-py's IQ2_XXS holds."""
    return torch.frombuffer(bytearray(quants.IQ2_XXS.ksigns), dtype=torch.uint8)


def _signs(sign_bytes: torch.Tensor) -> torch.Tensor:
    """Bytes (...) → (..., 8) of ±1: bit i set makes value i negative."""
    return 1 - 2 * ((sign_bytes[..., None] >> _BITS) & 1).to(torch.int16)


def _d(b: torch.Tensor) -> torch.Tensor:
    """Each block's float16 d (its first 2 bytes) as a float32 column (blocks, 1)."""
    return half(b[:, 0:2]).float()[:, None]


def _codes(values: torch.Tensor, groups: int) -> torch.Tensor:
    return values.to(torch.int8).reshape(len(values), groups, -1)


def _iq2_xxs(b: torch.Tensor):
    n = len(b)
    index = b[:, 2:66].reshape(n, 8, 8)[:, :, 0:4].long()  # (n, 8, 4): the first u32's bytes
    aux = u32(b[:, 2:66]).reshape(n, 8, 2)[:, :, 1]
    sign_index = (aux[..., None] >> torch.tensor([0, 7, 14, 21])) & 0x7F  # (n, 8, 4)
    values = grid("IQ2_XXS")[index] * _signs(_sign_patterns()[sign_index])
    scale = _d(b) * (0.5 + (aux >> 28).float()) * 0.25
    return _codes(values, 8), scale


def _iq2_ls_scales(d: torch.Tensor, ls_bytes: torch.Tensor) -> torch.Tensor:
    """Per 16 values: d (ls + 1/2) / 4 with ls the nibbles of 8 bytes."""
    return d * (0.5 + nibble_pairs(ls_bytes).float()) * 0.25


def _iq2_xs(b: torch.Tensor):
    q = u16(b[:, 2:66])  # (n, 32)
    values = grid("IQ2_XS")[q & 511] * _signs(_sign_patterns()[q >> 9])
    return _codes(values, 16), _iq2_ls_scales(_d(b), b[:, 66:74])


def _iq2_s(b: torch.Tensor):
    n = len(b)
    high = ((b[:, 66:74, None] >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8)) & 3).reshape(n, 32)
    index = b[:, 2:34].long() | (high.long() << 8)
    values = grid("IQ2_S")[index] * _signs(b[:, 34:66])
    return _codes(values, 16), _iq2_ls_scales(_d(b), b[:, 74:82])


def _iq3_xxs(b: torch.Tensor):
    n = len(b)
    aux = u32(b[:, 66:98])  # (n, 8)
    sign_index = (aux[..., None] >> torch.tensor([0, 7, 14, 21])) & 0x7F
    values = grid("IQ3_XXS")[b[:, 2:66].long()].reshape(n, 8, 4, 8) * _signs(_sign_patterns()[sign_index])
    scale = _d(b) * (0.5 + (aux >> 28).float()) * 0.5
    return _codes(values, 8), scale


def _iq3_s(b: torch.Tensor):
    n = len(b)
    high = ((b[:, 66:74, None] >> _BITS) & 1).reshape(n, 64)
    index = b[:, 2:66].long() | (high.long() << 8)
    values = grid("IQ3_S")[index].reshape(n, 32, 8) * _signs(b[:, 74:106])
    ints = (1 + 2 * nibble_pairs(b[:, 106:110])).to(torch.uint8)  # (n, 8), at most 31
    return _codes(values, 8), (ints, half(b[:, 0:2]))


def _iq1_codes(grid_index: torch.Tensor, delta_negative: torch.Tensor) -> torch.Tensor:
    """8 (grid ± 1/8): the grid's rows (..., 8) in {-1, 0, 1}, the delta's sign per row."""
    return 8 * grid("IQ1_S")[grid_index] + (1 - 2 * delta_negative.to(torch.int16))[..., None]


def _iq1_s(b: torch.Tensor):
    n = len(b)
    qh = u16(b[:, 34:50])  # (n, 8)
    high = ((qh[..., None] >> torch.tensor([0, 3, 6, 9])) & 7).reshape(n, 32)
    delta_negative = (qh >> 15).repeat_interleave(4, dim=1)  # one sign per sub-block of 4 rows
    values = _iq1_codes(b[:, 2:34].long() | (high.long() << 8), delta_negative)
    scale = _d(b) * (2 * ((qh >> 12) & 7) + 1).float() * 0.125
    return _codes(values, 8), scale


def _iq1_m(b: torch.Tensor):
    n = len(b)
    packed = u16(b[:, 48:56])  # (n, 4): 4 x 3-bit ls below, a nibble of d on top
    d_bits = ((packed >> 12) << torch.tensor([0, 4, 8, 12])).sum(dim=1, keepdim=True)
    d = torch.where(d_bits >= 1 << 15, d_bits - (1 << 16), d_bits).to(torch.int16).view(torch.float16).float()
    ls = ((packed[..., None] >> torch.tensor([0, 3, 6, 9])) & 7).reshape(n, 16)
    qh = nibble_pairs(b[:, 32:48])  # per row of 8 values
    values = _iq1_codes(b[:, 0:32].long() | ((qh & 7).long() << 8), (qh >> 3) & 1)
    return _codes(values, 16), d * (2 * ls + 1).float() * 0.125


def _per_group(d: torch.Tensor) -> torch.Tensor:
    """A super-block's float16 d (blocks, 2 bytes) as the scale of each of its 8 groups of 32."""
    return half(d)[:, None].repeat(1, 8)


def _tq2_0(b: torch.Tensor):
    return _codes(crumbs(b[:, 0:64]).to(torch.int16) - 1, 8), _per_group(b[:, 64:66])


def _tq1_0(b: torch.Tensor):
    """Five base-3 digits a byte (four in the last 4 bytes), stored as byte = ceil(value * 256 / 243):
    digit k is the top base-3 digit of byte * 3^k mod 256, i.e. (that * 3) >> 8."""
    n = len(b)

    def digits(bytes_: torch.Tensor, powers: list[int]) -> torch.Tensor:
        shifted = (bytes_.to(torch.int32)[:, None, :] * torch.tensor(powers, dtype=torch.int32)[:, None]) & 0xFF
        return ((shifted * 3) >> 8).reshape(n, -1)

    q = torch.cat([digits(b[:, 0:32], [1, 3, 9, 27, 81]), digits(b[:, 32:48], [1, 3, 9, 27, 81]),
                   digits(b[:, 48:52], [1, 3, 9, 27])], dim=1)
    return _codes(q - 1, 8), _per_group(b[:, 52:54])


CONVERT = {"IQ2_XXS": _iq2_xxs, "IQ2_XS": _iq2_xs, "IQ2_S": _iq2_s, "IQ3_XXS": _iq3_xxs, "IQ3_S": _iq3_s,
           "IQ1_S": _iq1_s, "IQ1_M": _iq1_m, "TQ2_0": _tq2_0, "TQ1_0": _tq1_0}
GROUPS = {"IQ2_XXS": 32, "IQ2_XS": 16, "IQ2_S": 16, "IQ3_XXS": 32, "IQ3_S": 32, "IQ1_S": 32, "IQ1_M": 16,
          "TQ2_0": 32, "TQ1_0": 32}


def _iq1_s_low(codes: torch.Tensor) -> torch.Tensor:
    """A group's low code: 8 g + delta with delta = 1 (codes = 1 mod 8) → -7, delta = -1 → -9."""
    return torch.where(codes[..., :1].remainder(8) == 1, -7, -9)


# type → (step, low: an int, or of the (N, groups, 32) codes, per group)
AFFINE4 = {"IQ3_S": (2, -15), "IQ1_S": (8, _iq1_s_low), "TQ2_0": (1, -1), "TQ1_0": (1, -1)}


def affine4(name: str, codes: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q (N, K) uint8 in 0..15, scale, zero (N, K/32) float32) of a type in AFFINE4 from its exact
    8-bit form (codes (N, K) int8, its scale table)."""
    step, low = AFFINE4[name]
    n = codes.shape[0]
    grouped = codes.view(n, -1, 32).to(torch.int16)
    low = low(grouped) if callable(low) else torch.full_like(grouped[..., :1], low)  # (N, groups, 1)
    q = ((grouped - low) // step).to(torch.uint8).reshape(n, -1)
    s = table_values(scale)
    return q, s * step, s * low[..., 0].float()
