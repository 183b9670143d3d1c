"""Int8 weights times int8 activations in one integer GEMM (torch._int_mm: int8 x int8 -> int32).

Vector-wise scales on both sides (Dettmers et al. 2022, section 3.1; SmoothQuant's per-token
dynamic activations with per-channel weights, Xiao et al. 2022, section 4):

    x (M, K) -> xq = round(x / dx_m),  dx_m = max_k |x_mk| / 127      one scale per row (token)
    W (N, K) -> Wq = round(W / dw_n),  dw_n = max_k |W_nk| / 127      one scale per output channel
    y_mn = dx_m * dw_n * sum_k xq_mk Wq_nk                             the sum exact in int32

Because each scale belongs to a whole row, it factors out of the dot product over all of K, so the
sum runs in integers end to end. (The project's C++ kernel, quant_matmul.cpp, rounds x with one scale
per group of 32 instead and takes that granularity whatever the weight: it cannot compute this
formula, and torch._int_mm was also faster on SmolLM2's shapes, M = 1..512, 2 threads, on a CPU with
VNNI.)

Where the CPU has no int8 dot-product instructions, torch's integer GEMM is a slow generic loop, and
the same integers come out of float32 matmuls instead (int8_dot): a product of two codes is at most
127^2, so over at most EXACT_FLOAT_K terms every partial sum is an integer below 2^24, which float32
holds exactly whatever order the GEMM adds in; longer rows are cut into chunks of that length and the
chunks' sums added in int32. The float route converts the whole weight to float32 on every call,
four bytes written a weight where the integer GEMM reads one: for fewer than FLOAT_MIN_ROWS rows of a
weight whose float copy outgrows the last-level cache that traffic costs more than the integer
GEMM's loop, which then stays.
"""
from __future__ import annotations

import functools
import sys

import torch

from flashserve.cpu_info import cpu_info
from flashserve.quantization.packed import PackedWeight, _param

QMAX = 127
EXACT_FLOAT_K = 2**24 // (QMAX * QMAX)  # 1040 terms of at most 127^2 stay below float32's 2^24
# CPU features under which torch's int8 GEMM (oneDNN) runs on int8 dot-product instructions
INT8_DOT_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
FLOAT_MIN_ROWS = 8  # activation rows from which the float route pays for converting any weight
CACHED_FLOAT_VALUES = 8 << 20  # a weight's values whose float32 copy (32 MiB) a last-level cache holds


def quantize_rows_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a float (R, K) → (codes (R, K) int8, scale (R,) float32);
    an all-zero row gets scale 1 (its codes are 0 either way)."""
    t = t.float()
    amax = t.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return torch.round(t / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8), scale


@functools.cache
def integer_gemm_is_fast(device_type: str) -> bool:
    """Whether torch._int_mm runs on int8 dot-product hardware on this device: on a CPU only with
    those instructions."""
    return device_type != "cpu" or bool(cpu_info().flags & INT8_DOT_FEATURES)


def int8_dot_float(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """sum_k xq[m, k] wq[n, k] for codes in [-QMAX, QMAX], exactly, through float32 matmuls over
    chunks of EXACT_FLOAT_K → (M, N) int32."""
    acc = None
    for k0 in range(0, xq.shape[1], EXACT_FLOAT_K):
        part = torch.mm(xq[:, k0:k0 + EXACT_FLOAT_K].float(), wq[:, k0:k0 + EXACT_FLOAT_K].float().t())
        acc = part.to(torch.int32) if acc is None else acc.add_(part.to(torch.int32))
    return acc


def int8_dot(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """xq (M, K) int8 times wq (N, K) int8 → (M, N) int32, the same integers on either path."""
    few_rows_of_a_large_weight = xq.shape[0] < FLOAT_MIN_ROWS and wq.numel() > CACHED_FLOAT_VALUES
    if integer_gemm_is_fast(xq.device.type) or few_rows_of_a_large_weight:
        return torch._int_mm(xq, wq.t())
    return int8_dot_float(xq, wq)


def int8_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, dot=int8_dot) -> torch.Tensor:
    """x (M, K) float rounded per row to int8, times wq (N, K) int8 with scales (N,) → (M, N) float32;
    `dot` takes the integer products (benchmarks name a route)."""
    xq, x_scale = quantize_rows_int8(x)
    return dot(xq, wq).float().mul_(x_scale[:, None]).mul_(w_scale)


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
