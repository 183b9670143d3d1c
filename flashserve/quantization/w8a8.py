"""Int8 weights times int8 activations in one integer GEMM (torch._int_mm: int8 x int8 -> int32).

Vector-wise scales on both sides (Dettmers et al. 2022, section 3.1; SmoothQuant's per-token
dynamic activations with per-channel weights, Xiao et al. 2022, section 4):

    x (M, K) -> xq = round(x / dx_m),  dx_m = max_k |x_mk| / 127      one scale per row (token)
    W (N, K) -> Wq = round(W / dw_n),  dw_n = max_k |W_nk| / 127      one scale per output channel
    y_mn = dx_m * dw_n * sum_k xq_mk Wq_nk                             the sum exact in int32

Because each scale belongs to a whole row, it factors out of the dot product over all of K, so the
sum runs in integers end to end. (The project's C++ kernel, quant_matmul.cpp, rounds x with one scale
per group of 32 instead and takes that granularity whatever the weight: it cannot compute this
formula, and torch._int_mm was also faster on SmolLM2's shapes, M = 1..512, 2 threads.)
"""
from __future__ import annotations

import sys

import torch

from flashserve.quantization.packed import PackedWeight, _param

QMAX = 127


def quantize_rows_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a float (R, K) → (codes (R, K) int8, scale (R,) float32);
    an all-zero row gets scale 1 (its codes are 0 either way)."""
    t = t.float()
    amax = t.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.round(t / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8), scale


def int8_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x (M, K) float rounded per row to int8, times wq (N, K) int8 with scales (N,) → (M, N) float32."""
    xq, x_scale = quantize_rows_int8(x)
    acc = torch._int_mm(xq, wq.t())  # (M, N) int32
    return acc.float().mul_(x_scale[:, None]).mul_(w_scale)


class W8A8Weight(PackedWeight):
    """A Linear's weight as per-output-channel int8 codes; x is rounded per token to int8 on every call."""

    act_dtype = torch.float32
    kernel_dtype = torch.float32
    large_m = sys.maxsize  # the integer GEMM at every M: a row's result never depends on the batch

    def __init__(self, weight: torch.Tensor):
        """weight (N, K) float."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = quantize_rows_int8(weight)
        self.q = _param(q.contiguous())  # (N, K) int8
        self.scale = _param(scale)  # (N,) float32

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.q, self.scale)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.q[start:end].float() * self.scale[start:end, None]
