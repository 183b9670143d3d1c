"""Weights packed for quantized CPU kernels, each an nn.Module mapping x (..., K) → (..., N): the
PackedWeight interface with its per-shape choice between kernel and dequantize + GEMM (below), and
the forms that hold no codes of their own. The loaders' packing choices (gguf_method.py,
int4_method.py) build them; Linear and VocabEmbedding run them (model/layers).

    GroupQuantWeight  this project's C++ kernel (group_quant_weight.py): w = q * s + z per group
                 along K, 4-bit, 5-bit or 8-bit codes. The default when the C++ build works.
    Int4Weight, Int8Weight, Int8GroupWeight  torch's int4 / int8 kernels, the fallback without a
                 C++ compiler (torch_int_weights.py).
    DenseWeight  F.linear on a float weight, for parts no kernel takes.
    RowSegments  several of the above stacked along N (a merged q|k|v whose parts differ in type).
    PermutedInput  x's columns gathered into another order before one of the above (GPTQ act-order).

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

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32
CHUNK_ROWS = 4096  # rows dequantized at a time on the large-M path (multiple of 64)
KERNEL_DTYPE = torch.bfloat16


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class PackedWeight(nn.Module):
    in_features: int
    out_features: int
    act_dtype = KERNEL_DTYPE  # what kernel() takes; the large-M path rounds x to it too
    kernel_dtype = KERNEL_DTYPE  # what kernel() returns; the large-M path rounds to it too
    large_m = 64  # rows from which dequantize + float32 GEMM beats the kernel (table above)
    chunk_rows = CHUNK_ROWS  # rows dequantized at a time on the large-M path

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


def stacked_parts(w: PackedWeight) -> list[PackedWeight]:
    """The weights w runs, stacked along its output rows: RowSegments' parts, else w itself."""
    return list(w.parts) if isinstance(w, RowSegments) else [w]

