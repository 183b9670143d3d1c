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

down_proj (optional, beyond the paper): its input act(gate) * up is linear in up's rows, so diag(s)^-1
folds into those rows as it does into a norm. SwiGLU models have their largest activations there
(SmolLM2-135M: |x| up to ~3300, benchmarks/RESULTS.md), where the paper's OPT/BLOOM place a GELU
that nothing can be folded through.
"""
from __future__ import annotations

import torch
from torch import nn

from flashserve.model.layers.linear import MergedLinear

ALPHA = 0.5
_FLOOR = 1e-5  # a channel never seen (max 0) or an all-zero weight column keeps a finite, positive scale


def smoothing_scales(x_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """x_max (K,) calibration maxima of |x|, weight (N, K) → s (K,) float32 (eq. 4)."""
    w_max = weight.float().abs().amax(dim=0).clamp_min(_FLOOR)  # (K,)
    return (x_max.float().clamp_min(_FLOOR).pow(alpha) / w_max.pow(1 - alpha)).clamp_min(_FLOOR)


def smoothed_pairs(layer: nn.Module, down_proj: bool = False) -> list[tuple[nn.Module, nn.Module]]:
    """(what produces X, the linear reading X) of a Llama-family decoder layer: the two RMSNorms, and with
    down_proj the merged gate|up linear (its up rows) before down_proj."""
    pairs = [(layer.input_layernorm, layer.self_attn.qkv_proj),
             (layer.post_attention_layernorm, layer.mlp.gate_up_proj)]
    return pairs + [(layer.mlp.gate_up_proj, layer.mlp.down_proj)] if down_proj else pairs


@torch.no_grad()
def fold(producer: nn.Module, linear: nn.Module, s: torch.Tensor) -> None:
    """X / s into what produces X (a norm's weight, or gate|up's up rows and bias), s into the linear's
    columns: the pair computes the same."""
    if isinstance(producer, MergedLinear):
        start, size = producer.part_offsets["up"]
        producer.weight.data[start : start + size] /= s[:, None].to(producer.weight.dtype)
        if producer.bias is not None:
            producer.bias.data[start : start + size] /= s.to(producer.bias.dtype)
    else:
        producer.weight.data = (producer.weight.data.float() / s).to(producer.weight.dtype)
    linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)


def smooth(layers, maxima: dict, alpha: float, down_proj: bool = False) -> None:
    """Folds every layer's scales, all taken from the weights before any fold (gate|up is both a reader
    and, with down_proj, a producer); maxima: linear → max |x| (K,) of its input
    (calibrate.engine_input_maxima)."""
    for layer in layers:
        pairs = smoothed_pairs(layer, down_proj)
        scales = [smoothing_scales(maxima[linear], linear.weight, alpha) for _, linear in pairs]
        for (producer, linear), s in zip(pairs, scales):
            fold(producer, linear, s)
