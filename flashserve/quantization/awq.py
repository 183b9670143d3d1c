"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"), 4-bit with zero points, in groups along the input.

Weights that meet large activations matter most (section 3.1). Instead of keeping them in float, AWQ
scales input channel k of a linear up by s_k before rounding and the input down by 1/s_k, which
shrinks the relative rounding error of the salient channels (section 3.2, eq. 4-5):

    Q(W diag(s)) (diag(s)^-1 X),   s = s_X^alpha,   s_X = mean_t |x_tk|   (per input channel)
    alpha* = argmin_{alpha in [0, 1)} || Q(W diag(s)) diag(s)^-1 X - W X ||

searched on a grid of 20 values, once for the linears that read the same input (q|k|v; gate|up).
diag(s)^-1 is folded into whatever produced X (the RMSNorm's weight, or the rows of the previous
linear), so inference runs the plain quantized weights. Q is round-to-nearest (rtn.py, asymmetric).
"""
from __future__ import annotations

import torch

from flashserve.quantization.rtn import fake_quantize

GRID = 20  # alpha = 0, 1/20, ..., 19/20


def search_scale(x: torch.Tensor, weights: list[torch.Tensor], group: int) -> tuple[torch.Tensor, float, float]:
    """x (T, K) inputs shared by `weights` (each (N_i, K)) → (s (K,), alpha, its error / alpha=0's error)."""
    x = x.float()
    w = torch.cat([t.float() for t in weights])  # (N, K)
    ref = x @ w.t()  # (T, N) float output
    x_mean = x.abs().mean(0).clamp_min(1e-8)  # s_X (K,)
    best = (float("inf"), None, 0.0)
    base = None
    for step in range(GRID):
        alpha = step / GRID
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1 in log scale, so the grid's fp16 scales stay normal
        wq = fake_quantize(w * s, group, sym=False) / s
        err = (x @ wq.t() - ref).pow(2).mean().item()
        base = err if base is None else base
        if err < best[0]:
            best = (err, s, alpha)
    err, s, alpha = best
    return s, alpha, err / base if base else 1.0
