"""Which packed form (packed.py and its kinds) a GGUF weight gets when quantized execution is on.

With this project's C++ kernels built (the usual case on CPU), every quantized weight becomes a
GroupQuantWeight: codes with a float32 scale and zero per group, float32 activations.

    Q4_0, Q4_1, Q4_K             → 4-bit codes, groups of 32: the file's own codes and exact s, z
                                   (Q4_K's as its own 6-bit integers times float16 factors: 4.625 bits)
    Q5_0                         → 5-bit codes, groups of 32: the file's own blocks and exact d
    (4- and 5-bit codes keep their bits in the 16-lane tiles, where the build has them)
    Q8_0, IQ4_NL                 → 8-bit codes, groups of 32, exact (float16 d); IQ4_NL's in the 16-lane
                                   tiles 4-bit indices into its levels (4.5 bits)
    Q5_1                         → 8-bit codes, groups of 32, exact: float16 d and m as scale and zero
    Q5_K                         → 8-bit codes, groups of 32, exact: factored scale and zero (8.625 bits)
    IQ4_XS                       → 8-bit codes, groups of 32, exact: factored scale (8.3125 bits); in the
                                   16-lane tiles 4-bit indices into its levels, int8 integers (4.3125 bits)
    Q6_K, Q3_K                   → 8-bit codes, groups of 16, exact: factored scale (8.625 bits); in
                                   the 16-lane tiles (AVX-512) 6-bit (Q6_K) or 3-bit (Q3_K) codes, int8
                                   integers (6.625 and 3.625 bits)
    IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S (AVX-512)
                                 → the file's own blocks (codebook_weight.py): 2.0625 to 3.4375 bits (IQ1_*
                                   and IQ2_S with their grid words for indices: 2.19 to 3.31), the
                                   grid looked up in the 16-lane tiled kernel, the 8-bit form's numbers
    Q2_K, and without AVX-512 IQ3_XXS, IQ2_XXS/XS/S, IQ1_M
                                 → 8-bit codes, exact (gguf_codebook_forms.py): groups of 32, or of 16
                                   (Q2_K, IQ2_XS, IQ2_S, IQ1_M); in the 16-lane tiles Q2_K's are 2-bit
                                   (3.25 bits with its factored scale and zero)
    (groups of 16 take int8 activations too, x rounded per 32 values: group_quant_weight.int8_groups_fit)
    TQ1_0, TQ2_0, and without AVX-512 IQ3_S, IQ1_S
                                 → 4-bit codes, groups of 32, exact: codes affine in the grid's
                                   (gguf_codebook_forms.affine4), float32 scale and zero (6 bits);
                                   an embedding's rows take their exact 8-bit form
    token embedding (row lookups, tied head) → 5-bit codes for Q5_0, the exact 8-bit forms above
                                   and Q4_0 exactly in 8, other types (Q4_1, Q4_K, ...) requantized
                                   per group of 32
    Exact means codes * scale (+ zero) in float32 is gguf-py's dequantization bit for bit
    (gguf_int8_forms.py gives the layouts).

Parts merged into one weight (q|k|v, gate|up) take one form when one holds them all exactly: a Q5_0
part beside Q8_0 ones goes 8-bit (Gemma 3's and Qwen2's v is Q8_0 beside Q5_0 q and k), and 8-bit parts
of different types share one form, still exact (gguf_int8_forms.merged), so the merged weight stays
one kernel call, which the C++ decode step needs.

Without them, torch's bfloat16 kernels take over:

    Q4_0, Q4_1, Q4_K             → Int4Weight: the file's own codes, groups of 32 (gguf_blocks.py);
                                   exact up to rounding s and z to bfloat16: |Δw| <= 2^-8 (8|s| + |z|)
    Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 → Int8Weight: dequantized, then requantized per row;
                                   adds |Δw| <= max|w_row| / 254 to the file's own error
    token embedding              → Int8GroupWeight: Q8_0/Q5_0/Q4_0 exactly, others per group of 32

Anything else (F16, BF16, MXFP4; without this project's kernels Q2_K, Q3_K and every i-quant) →
DenseWeight in the compute dtype, as without quantization.
Speeds per shape: benchmarks/linear_kernels.py.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType as Q

from flashserve.quantization.gguf_blocks import (
    GROUP,
    INT4_TYPES,
    INT8_GROUP_TYPES,
    GGUFTensor,
    int4_groups,
    int4_packed,
    int5_packed,
    int8_groups,
    release_mapped,
)
from flashserve.quantization.codebook_weight import BLOCK_BYTES as CODEBOOK_TYPES
from flashserve.quantization.codebook_weight import CodebookWeight
from flashserve.quantization.codebook_weight import available as codebook_tiles_available
from flashserve.quantization.gguf_codebook_forms import AFFINE4, affine4
from flashserve.quantization.gguf_int8_forms import EXACT_INT8_TYPES, GROUPS, Int8Form, exact_int8, merged
from flashserve.quantization.group_quant_weight import GroupQuantWeight, factored_table
from flashserve.quantization.int4_format import Int4Groups
from flashserve.quantization.int4_method import pack_int4_groups
from flashserve.quantization.packed import DenseWeight, PackedWeight, RowSegments, stacked_parts
from flashserve.quantization.torch_int_weights import (Int4Weight, Int8GroupWeight, Int8Weight, quantize_groups,
                                                       quantize_rows)

INT8_TYPES = frozenset({Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0})  # 8-bit on either kernel
AFFINE4_TYPES = frozenset(Q[name] for name in AFFINE4)  # 4-bit on this project's kernel
KERNEL_TYPES = INT4_TYPES | INT8_TYPES | EXACT_INT8_TYPES  # GGUF types that run packed rather than dequantized
# Rows dequantized at a time while requantizing: gguf-py's dequantization and the requantization each
# hold several float copies of a piece (Q6_K, 4096 rows of 1536: dequantizing alone +50 MiB transient;
# a process loading Qwen2.5-Coder-1.5B under layer streaming, which writes its packed-layer file, peaked
# 708 MiB with 4096, 481 with 1024 and the heap trimmed after each layer, measured)
_ROWS = 1024
_FOLIO_BYTES = 2 << 20  # the largest page-cache folio on x86-64 (a PMD)

Part = GGUFTensor | Int4Groups | torch.Tensor  # a dense part arrives as a float tensor


def kind_of(part: Part, own_kernels: bool) -> str:
    if isinstance(part, Int4Groups):  # a GPTQ/AWQ checkpoint's linear (int4_method.py)
        return "int4_groups"
    if isinstance(part, GGUFTensor):
        if part.qtype in INT4_TYPES:
            return "int4"
        if part.qtype == Q.Q5_0 and own_kernels:
            return "int5"
        if own_kernels and part.qtype.name in CODEBOOK_TYPES and codebook_tiles_available():
            return f"codebook {part.qtype.name}"  # one type a weight, at its own bits
        if part.qtype in AFFINE4_TYPES and own_kernels:
            return "affine4"
        if part.qtype in INT8_TYPES or (own_kernels and part.qtype in EXACT_INT8_TYPES):
            return "int8"
    return "dense"


def _merged_kinds(kinds: list[str]) -> list[str]:
    """5-bit parts beside 8-bit ones go 8-bit too (module docstring): one exact form, one segment."""
    return ["int8" if k == "int5" else k for k in kinds] if "int8" in kinds else kinds


def pack_linear(parts: list[Part], dtype: torch.dtype, own_kernels: bool | None = None) -> PackedWeight | None:
    """One weight for parts stacked along the output rows (q|k|v, gate|up, or a single part);
    None when no part has a quantized kernel (the caller keeps its float weight).
    own_kernels: this project's C++ kernel (True) or torch's (False); None: ours when it built."""
    own = _own_kernels() if own_kernels is None else own_kernels
    if all(kind_of(p, own) == "dense" for p in parts):
        return None
    kinds = _merged_kinds([kind_of(p, own) for p in parts])
    segments = []
    for kind, run in itertools.groupby(zip(kinds, parts), key=lambda kp: kp[0]):
        packed = _pack(kind, [p for _, p in run], dtype, own)
        segments += stacked_parts(packed)
    return segments[0] if len(segments) == 1 else RowSegments(segments)


def pack_embedding(t: GGUFTensor, own_kernels: bool | None = None) -> Int8GroupWeight | GroupQuantWeight:
    """Rows must be looked up exactly (Gemma 3 scales them by sqrt(d) into the residual: per-row
    requantization raised its perplexity by 1.9%), so the table keeps per-group scales:
    Q5_0 at its own 5 bits, Q8_0/Q4_0 exactly in 8, other types requantized per group of 32."""
    own = _own_kernels() if own_kernels is None else own_kernels
    if own and t.qtype == Q.Q5_0:
        return GroupQuantWeight(*_rows_converted([t], _int5_codes), None, bits=5, packed=True)
    if own and t.qtype in EXACT_INT8_TYPES:
        return _exact_int8_weight([t])
    codes, scale = _rows_converted([t], _int8_group_codes)
    if own:
        return GroupQuantWeight(codes, scale, None, bits=8)
    return Int8GroupWeight(codes, scale)


def _pack(kind: str, parts: list[Part], dtype: torch.dtype, own_kernels: bool) -> PackedWeight:
    if kind == "int4_groups":
        return pack_int4_groups(parts, own_kernels)
    if kind == "int4":
        if own_kernels and all(p.qtype == Q.Q4_K for p in parts):  # the file's own factors (factored tables)
            return GroupQuantWeight(*_q4k_weight(parts), bits=4, packed=True)
        if own_kernels:  # w = q s + (z - 8 s), computed in float64 where it is exact; codes as the file packs them
            codes, scale, zero = (np.concatenate(x) for x in zip(*(int4_packed(p) for p in parts)))
            return GroupQuantWeight(torch.from_numpy(codes), torch.from_numpy(scale),
                                    torch.from_numpy(zero - 8.0 * scale), bits=4, packed=True)
        codes, scale, zero = (np.concatenate(x) for x in zip(*(int4_groups(p) for p in parts)))
        return Int4Weight(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(zero))
    if kind.startswith("codebook "):
        return CodebookWeight(parts[0].qtype.name, torch.cat([p.block_bytes() for p in parts]))
    if kind == "affine4":  # parts of different types too: the same codes and float32 tables
        return GroupQuantWeight(*_rows_converted(parts, _affine4_codes), bits=4)
    if kind == "int5":  # the file's own blocks less their scale (gguf_blocks.int5_packed)
        return GroupQuantWeight(*_rows_converted(parts, _int5_codes), None, bits=5, packed=True)
    if kind == "int8":
        if own_kernels:
            return _exact_int8_weight(parts)
        return Int8Weight(*_rows_converted(parts, lambda chunk: quantize_rows(_dense(chunk))))
    return DenseWeight(torch.cat([_dense(p) for p in parts]).to(dtype))


def _q4k_weight(parts: list[GGUFTensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes and factored scale and zero tables of Q4_K parts stacked by rows (gguf_blocks.q4k_factored),
    in one C++ pass that writes each part's rows in place, byte for byte numpy's several."""
    from flashserve.kernels import ops

    codes, sc, d, mn, neg_dmin = ops.native().q4k_factored_parts([p.block_bytes() for p in parts])
    return codes, factored_table(sc, d), factored_table(mn, neg_dmin)


def _exact_int8_weight(parts: list[GGUFTensor]) -> GroupQuantWeight:
    """Parts of EXACT_INT8_TYPES as 8-bit codes exactly (gguf_int8_forms.py): one weight, parts of
    different types merged into one form."""
    runs = [list(run) for _, run in itertools.groupby(parts, key=lambda p: p.qtype)]
    forms = [_int8_form(run) for run in runs]
    return _int8_weight(forms[0] if len(forms) == 1 else merged(forms))


def _int8_form(parts: list[GGUFTensor]) -> Int8Form:
    """Parts of one type, converted a chunk of rows at a time into tensors made once."""
    codes, scale, *zero = _rows_converted(parts, exact_int8)
    return Int8Form(codes, scale, zero[0] if zero else None, GROUPS[parts[0].qtype])


def _int8_weight(form: Int8Form) -> GroupQuantWeight:
    return GroupQuantWeight(form.codes, form.scale, form.zero, bits=8, group=form.group)


def _int8_group_codes(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0/Q5_0/Q4_0 exactly, other types requantized per group of 32 (|Δw| <= max|w_group| / 254):
    torch's per-group embedding table, and this project's for types without an exact 8-bit form."""
    if t.qtype in INT8_GROUP_TYPES:
        return tuple(torch.from_numpy(a) for a in int8_groups(t))
    # Q6_K reaches here for torch's kernels only (this project's take it exactly); when this project's
    # built, one C++ pass does bit for bit the two torch passes below
    if t.qtype == Q.Q6_K and _own_kernels():
        from flashserve.kernels import ops

        return ops.native().q6k_requantize_int8(t.block_bytes())
    return quantize_groups(_dense(t))


def _affine4_codes(t: GGUFTensor) -> tuple[torch.Tensor, ...]:
    return affine4(t.qtype.name, *exact_int8(t))


def _int5_codes(t: GGUFTensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.from_numpy(a) for a in int5_packed(t))


def _own_kernels() -> bool:
    """This project's C++ kernel (float32 activations, exact scales) when it built; else torch's."""
    from flashserve.kernels import ops

    return ops.available()


def _dense(part: Part) -> torch.Tensor:
    return part if isinstance(part, torch.Tensor) else torch.from_numpy(part.dequantize())


def _rows_converted(parts: list[Part], convert) -> tuple[torch.Tensor, ...]:
    """convert(chunk) of every row chunk of the parts, stacked along the rows into tensors made once,
    each chunk's file pages released as soon as it is converted: the peak is the result and one chunk
    (not the result, a list of chunk results for torch.cat, and the tensor's whole file range: Gemma 3's
    170 MiB Q8_0 embedding raised the start-up peak by ~2x its size, measured)."""
    total, outs, row = sum(p.shape[0] for p in parts), None, 0
    for part in parts:
        mapped = isinstance(part, GGUFTensor)
        # Released from a little before each chunk: the kernel maps a file folio (up to 2 MiB) whole on
        # a fault, so reading a chunk mapped the tail of the one before again (measured: half of the
        # embedding stayed resident when only each chunk's own range was released).
        back = -(-_FOLIO_BYTES // max(1, part.raw.strides[0])) if mapped else 0
        for start, end, chunk in _row_chunks(part):
            pieces = convert(chunk)
            if outs is None:
                outs = tuple(torch.empty((total, *x.shape[1:]), dtype=x.dtype) for x in pieces)
            for out, x in zip(outs, pieces):
                out[row:row + x.shape[0]] = x
            row += pieces[0].shape[0]
            if mapped:
                release_mapped(part.raw[max(0, start - back):end])
    return outs


def _row_chunks(part: Part) -> Iterator[tuple[int, int, Part]]:
    """(start, end, rows [start, end) of the part) in pieces of _ROWS rows, so a float copy never holds
    more than one piece."""
    for start in range(0, part.shape[0], _ROWS):
        end = min(start + _ROWS, part.shape[0])
        if isinstance(part, GGUFTensor):
            yield start, end, GGUFTensor(part.raw[start:end], part.qtype, (end - start, part.shape[1]))
        else:
            yield start, end, part[start:end]
