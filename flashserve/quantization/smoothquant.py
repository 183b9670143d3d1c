"""SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth, Han 2022, "SmoothQuant: Accurate and Efficient
Post-Training Quantization for Large Language Models"), section 4.

Activations are hard to round to int8 (a few channels are 10-100x larger than the rest), weights easy.
SmoothQuant moves part of the difficulty into the weights by a per-input-channel scale s, which leaves
the product unchanged:

    Y = (X diag(s)^-1) (diag(s) W^T),   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)    (eq. 4)

max|X_j| over calibration tokens, max|W_j| over the weight's column j (every linear reading X), alpha 0.5.
diag(s)^-1 is folded into the RMSNorm that produces X (for q|k|v and gate|up) and diag(s) into the
weight's columns, so inference runs the plain W8A8 matmul (w8a8.py) on every decoder linear; o_proj
and down_proj, which no norm feeds, are W8A8 without smoothing.
"""
from __future__ import annotations

import torch
from torch import nn

ALPHA = 0.5
_FLOOR = 1e-5  # a channel never seen (max 0) or an all-zero weight column keeps a finite, positive scale


def smoothing_scales(x_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """x_max (K,) calibration maxima of |x|, weight (N, K) → s (K,) float32 (eq. 4)."""
    w_max = weight.float().abs().amax(dim=0).clamp_min(_FLOOR)  # (K,)
    return (x_max.float().clamp_min(_FLOOR).pow(alpha) / w_max.pow(1 - alpha)).clamp_min(_FLOOR)


def smoothed_pairs(layer: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(RMSNorm, the linear reading its output) of a Llama-family decoder layer."""
    return [(layer.input_layernorm, layer.self_attn.qkv_proj),
            (layer.post_attention_layernorm, layer.mlp.gate_up_proj)]


@torch.no_grad()
def fold(norm: nn.Module, linear: nn.Module, s: torch.Tensor) -> None:
    """norm(x) / s into the norm's weight, s into the linear's columns: the pair computes the same."""
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)
    linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)


def smooth(layers, maxima: dict, alpha: float) -> None:
    """Folds every layer's scales; maxima: linear → max |x| (K,) of its input (calibrate.engine_input_maxima)."""
    for layer in layers:
        for norm, linear in smoothed_pairs(layer):
            fold(norm, linear, smoothing_scales(maxima[linear], linear.weight, alpha))
