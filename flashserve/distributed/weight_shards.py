"""A rank's part of a weight, kept in the form it was loaded in: quantized weights stay quantized.

    rows_of(w, ranges)       output rows (column-parallel q|k|v, gate|up, vocabulary shards): any
                             rows of a packed weight may be taken, each row's groups stay whole
    cols_of(w, start, stop)  input columns (row-parallel o, down): on group boundaries only, 32
                             values (a GGUF block) or, for a factored K-quant table or a codebook
                             type's blocks (the i-quants IQ1_S .. IQ3_S), 256

A weight is (out_features, in_features). Ranges are half-open [start, stop) lists. Forms without a
rule here (torch's int4/int8 fallback kernels) raise rather than split wrongly.
"""
from __future__ import annotations

import copy
from functools import singledispatch

import torch
from torch import nn

from flashserve.quantization.codebook_weight import BLOCK, CodebookWeight
from flashserve.quantization.group_quant_weight import GroupQuantWeight
from flashserve.quantization.packed import DenseWeight, RowSegments
from flashserve.quantization.torch_int_weights import Int8GroupWeight

FACTOR_GROUPS = 8  # groups per float16 factor in a factored (uint8) scale table: a K-quant super-block


def row_index(ranges: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.int64)


def take_rows(t: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    return t[row_index(ranges)].contiguous()


@singledispatch
def rows_of(w: nn.Module, ranges: list[tuple[int, int]]) -> nn.Module:
    raise ValueError(f"a {type(w).__name__} weight cannot be split across tensor-parallel ranks")


@singledispatch
def cols_of(w: nn.Module, start: int, stop: int) -> nn.Module:
    raise ValueError(f"a {type(w).__name__} weight cannot be split across tensor-parallel ranks")


def _replace(w: nn.Module, out_features: int, in_features: int, **tensors) -> nn.Module:
    """A copy of packed weight `w` whose parameters `tensors` are replaced (its kernel choices kept)."""
    new = copy.copy(w)
    new._parameters = dict(w._parameters)
    for name, t in tensors.items():
        new._parameters[name] = None if t is None else nn.Parameter(t.contiguous(), requires_grad=False)
    new.out_features, new.in_features = out_features, in_features
    return new


def _count(ranges) -> int:
    return sum(b - a for a, b in ranges)


def _check_untiled(w: CodebookWeight) -> None:
    if w.tiled:
        raise ValueError("a codebook weight is split by its rows, before it is stored in tiles")


@rows_of.register
def _(w: CodebookWeight, ranges):  # split by rows (the file's blocks), before any tiling
    _check_untiled(w)
    idx = row_index(ranges)
    return _replace(w, len(idx), w.in_features, blocks=w.blocks[idx])


@cols_of.register
def _(w: CodebookWeight, start, stop):
    _check_untiled(w)
    if start % BLOCK or stop % BLOCK:
        raise ValueError(f"columns {start}:{stop} of a {w.qtype} weight do not fall on its {BLOCK}-value blocks")
    return _replace(w, w.out_features, stop - start, blocks=w.blocks[:, start // BLOCK : stop // BLOCK])


@rows_of.register
def _(w: GroupQuantWeight, ranges):
    idx = row_index(ranges)
    zero = None if w.zero is None else w.zero[idx]
    return _replace(w, len(idx), w.in_features, codes=w.codes[idx], scale=w.scale[idx], zero=zero)


@cols_of.register
def _(w: GroupQuantWeight, start, stop):
    if start % w.group or stop % w.group:
        raise ValueError(f"columns {start}:{stop} of a {w.bits}-bit weight do not fall on its "
                         f"{w.group}-value groups")
    g0, g1 = start // w.group, stop // w.group
    per_group = w.codes.shape[1] * w.group // w.in_features  # code bytes of one group
    zero = None if w.zero is None else _table_cols(w.zero, g0, g1, w.in_features // w.group)
    return _replace(w, w.out_features, stop - start, codes=w.codes[:, g0 * per_group : g1 * per_group],
                    scale=_table_cols(w.scale, g0, g1, w.in_features // w.group), zero=zero)


def _table_cols(t: torch.Tensor, g0: int, g1: int, groups: int) -> torch.Tensor:
    """Groups g0:g1 of a per-group table: float (N, groups), or factored uint8 (N, groups + groups / 4),
    the groups' integer bytes then one float16 factor per FACTOR_GROUPS groups."""
    if t.dtype != torch.uint8:
        return t[:, g0:g1]
    if g0 % FACTOR_GROUPS or g1 % FACTOR_GROUPS:
        raise ValueError(f"groups {g0}:{g1} split a K-quant super-block of {FACTOR_GROUPS} groups: a row-parallel "
                         f"split of this weight must fall on multiples of {FACTOR_GROUPS * 32} values")
    f0, f1 = groups + 2 * (g0 // FACTOR_GROUPS), groups + 2 * (g1 // FACTOR_GROUPS)
    return torch.cat([t[:, g0:g1], t[:, f0:f1]], dim=1)


@rows_of.register
def _(w: DenseWeight, ranges):
    return _replace(w, _count(ranges), w.in_features, weight=take_rows(w.weight, ranges))


@cols_of.register
def _(w: DenseWeight, start, stop):
    return _replace(w, w.out_features, stop - start, weight=w.weight[:, start:stop])


@rows_of.register
def _(w: Int8GroupWeight, ranges):  # an embedding table in torch's fallback form: (K/32, N, 32)
    idx = row_index(ranges)
    return _replace(w, len(idx), w.in_features, q=w.q[:, idx], scale=w.scale[:, idx],
                    kernel_scale=w.kernel_scale[:, idx])


@rows_of.register
def _(w: RowSegments, ranges):
    parts, offset = [], 0
    for part in w.parts:
        local = [(max(a, offset) - offset, min(b, offset + part.out_features) - offset) for a, b in ranges
                 if a < offset + part.out_features and b > offset]
        if local:
            parts.append(rows_of(part, local))
        offset += part.out_features
    return parts[0] if len(parts) == 1 else RowSegments(parts)


@cols_of.register
def _(w: RowSegments, start, stop):
    return RowSegments([cols_of(p, start, stop) for p in w.parts])
