"""Which packed form (packed.py) a GGUF weight gets when quantized execution is on.

    Q4_0, Q4_1, Q4_K             → Int4Weight: the file's own codes, groups of 32 (gguf_blocks.py);
                                   exact up to rounding s and z to bfloat16: |Δw| <= 2^-8 (8|s| + |z|)
    Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 → Int8Weight: dequantized, then requantized per row;
                                   adds |Δw| <= max|w_row| / 254 to the file's own error
    anything else (F16, Q2_K, Q3_K, i-quants) → DenseWeight in the compute dtype, as without quantization
    token embedding (row lookups, tied head) → Int8GroupWeight: Q8_0/Q5_0/Q4_0 exactly, others
                                   requantized per group of 32

Measured on the two catalogue models (tests/model/test_quant_linear.py, benchmarks/linear_kernels.py):
the int8 requantization error is a fraction of the 4/5/6-bit error already in the file, and the
int8 kernel at M=1 runs at about the speed of the int4 one, several times faster than a bfloat16
or float32 matmul on this CPU.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

from flashserve.quantization.gguf_blocks import INT4_TYPES, INT8_GROUP_TYPES, GGUFTensor, int4_groups, int8_groups
from flashserve.quantization.packed import (
    DenseWeight,
    Int4Weight,
    Int8GroupWeight,
    Int8Weight,
    PackedWeight,
    RowSegments,
    quantize_groups,
    quantize_rows,
)

INT8_TYPES = frozenset({Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0})
_ROWS = 4096  # rows dequantized at a time while requantizing (bounds the float32 copy)

Part = GGUFTensor | torch.Tensor  # a dense part arrives as a float tensor


def kind_of(part: Part) -> str:
    if isinstance(part, GGUFTensor):
        if part.qtype in INT4_TYPES:
            return "int4"
        if part.qtype in INT8_TYPES:
            return "int8"
    return "dense"


def pack_linear(parts: list[Part], dtype: torch.dtype) -> PackedWeight | None:
    """One weight for parts stacked along the output rows (q|k|v, gate|up, or a single part);
    None when no part has a quantized kernel (the caller keeps its float weight)."""
    kinds = [kind_of(p) for p in parts]
    if all(k == "dense" for k in kinds):
        return None
    segments = [_pack(kind, [p for _, p in run], dtype)
                for kind, run in itertools.groupby(zip(kinds, parts), key=lambda kp: kp[0])]
    return segments[0] if len(segments) == 1 else RowSegments(segments)


def pack_embedding(t: GGUFTensor) -> Int8GroupWeight:
    """Rows must be looked up exactly (Gemma 3 scales them by sqrt(d) into the residual: per-row
    requantization raised its perplexity by 1.9%), so the table keeps per-group scales:
    Q8_0/Q5_0/Q4_0 exactly, other types requantized per group of 32."""
    if t.qtype in INT8_GROUP_TYPES:
        codes, scale = int8_groups(t)
        return Int8GroupWeight(torch.from_numpy(codes), torch.from_numpy(scale))
    q, scale = zip(*(quantize_groups(_dense(chunk)) for chunk in _row_chunks(t)))
    return Int8GroupWeight(torch.cat(q), torch.cat(scale))


def _pack(kind: str, parts: list[Part], dtype: torch.dtype) -> PackedWeight:
    if kind == "int4":
        codes, scale, zero = (np.concatenate(x) for x in zip(*(int4_groups(p) for p in parts)))
        return Int4Weight(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(zero))
    if kind == "int8":
        q, scale = zip(*(quantize_rows(_dense(chunk)) for p in parts for chunk in _row_chunks(p)))
        return Int8Weight(torch.cat(q), torch.cat(scale))
    return DenseWeight(torch.cat([_dense(p) for p in parts]).to(dtype))


def _dense(part: Part) -> torch.Tensor:
    return part if isinstance(part, torch.Tensor) else torch.from_numpy(part.dequantize())


def _row_chunks(part: Part) -> Iterator[Part]:
    """The part in pieces of _ROWS rows, so a float copy never holds more than one piece."""
    for start in range(0, part.shape[0], _ROWS):
        end = min(start + _ROWS, part.shape[0])
        if isinstance(part, GGUFTensor):
            yield GGUFTensor(part.raw[start:end], part.qtype, (end - start, part.shape[1]))
        else:
            yield part[start:end]
