"""LLM.int8() (Dettmers, Lewis, Belkada, Zettlemoyer 2022, "LLM.int8(): 8-bit Matrix Multiplication
for Transformers at Scale"), section 3.2: mixed-precision decomposition.

A few hidden dimensions carry activations far larger than the rest; rounding a whole token to int8 with
one scale would wipe out the small values beside them. So, per matmul call,

    O = { k : max_m |x_mk| >= threshold }                     (threshold 6.0 in the paper)
    y = x[:, O] @ W[:, O]^T                                    float, 16-bit weights
      + int8_matmul(x with columns O zeroed, W)                vector-wise int8 (w8a8.py)

O is decided from this call's activations, as the paper does: a row's result can depend on the other
rows batched with it (an outlier column found in one token sends every token's column to the float
path). The int8 weight's row scales cover the whole row, O included; those columns meet zeros there.

Memory: the float path may need any column, so the weight is kept twice, as float16 (K, N) for the
float columns and as int8 codes: 3 bytes a weight. (bitsandbytes reads the outlier columns from the
int8 codes instead, 1 byte a weight, which rounds the outlier path's weights.)
"""
from __future__ import annotations

import sys

import torch

from flashserve.quantization.packed import PackedWeight, _param
from flashserve.quantization.w8a8 import int8_matmul, quantize_rows_int8

THRESHOLD = 6.0


class OutlierInt8Weight(PackedWeight):
    act_dtype = torch.float32
    kernel_dtype = torch.float32
    large_m = sys.maxsize

    def __init__(self, weight: torch.Tensor, threshold: float = THRESHOLD):
        """weight (N, K) float."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.threshold = threshold
        q, scale = quantize_rows_int8(weight)
        self.q = _param(q.contiguous())  # (N, K) int8
        self.scale = _param(scale)  # (N,) float32
        self.float_t = _param(weight.t().to(torch.float16).contiguous())  # (K, N): column k of W is row k

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        outlier = (x.abs() >= self.threshold).any(dim=0)  # (K,)
        cols = outlier.nonzero().squeeze(1)  # (|O|,)
        if cols.numel() == 0:
            return int8_matmul(x, self.q, self.scale)
        y = int8_matmul(x.masked_fill(outlier, 0.0), self.q, self.scale)  # (M, N)
        return y.addmm_(x[:, cols], self.float_t[cols].float())

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The float16 weight (what a call with every column an outlier multiplies)."""
        return self.float_t[:, start:end].t().float()
