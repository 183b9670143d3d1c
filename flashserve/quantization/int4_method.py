"""Which packed form (packed.py and its kinds) a GPTQ or AWQ linear (int4_format.Int4Groups) gets.

With this project's C++ kernels: a GroupQuantWeight of 4-bit codes in groups of 32, each of the
checkpoint's groups of 32/64/128 repeated as 1/2/4 kernel groups with s and z = -zero * s, so
q * s + z is exactly the checkpoint's (q - zero) * s. Scales take 16 bits per group of 32 and the
z table 32 (float32: -zero * s needs 15 significant bits), so 5.5 bits per weight in memory.
An act-order checkpoint (GPTQ's desc_act: groups gather scattered columns) is run with its columns
sorted by group and x gathered into that order (PermutedInput); q|k|v parts whose orders differ
become one segment each.

Without the C++ kernels: torch's Int4Weight, w = (q - 8) s + (8 - zero) s, s and z rounded to
bfloat16 (not exact, as for GGUF's Q4 types there), columns in checkpoint order only.
"""
from __future__ import annotations

import torch

from flashserve.errors import ModelFormatError
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from flashserve.quantization.int4_format import Int4Groups
from flashserve.quantization.packed import PackedWeight, PermutedInput, RowSegments
from flashserve.quantization.torch_int_weights import Int4Weight


def pack_int4_groups(parts: list[Int4Groups], own_kernels: bool) -> PackedWeight:
    """One packed weight for parts stacked along the output rows."""
    orders = [p.column_order() for p in parts]
    same = all(_same(o, orders[0]) for o in orders)
    if not own_kernels:
        if any(o is not None for o in orders):
            raise ModelFormatError("an act-order (desc_act) checkpoint needs flashserve's C++ kernels, which did not build")
        codes, scale, zero = (torch.cat(t) for t in zip(*(p.kernel_tables(None) for p in parts)))
        return Int4Weight(codes, scale, zero + 8.0 * scale)  # (q - 8) s + (z + 8 s) = q s + z
    if not same:
        return RowSegments([pack_int4_groups([p], own_kernels) for p in parts])
    order = orders[0]
    codes, scale, zero = (torch.cat(t) for t in zip(*(p.kernel_tables(order) for p in parts)))
    packed = GroupQuantWeight(codes, scale, zero, bits=4)
    return packed if order is None else PermutedInput(order, packed)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
