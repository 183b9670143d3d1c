"""Gated MLP activations: act(gate) * up on a fused [gate | up] projection."""
from __future__ import annotations

import torch

from flashserve.kernels import ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020). gate_up: (..., 2 * d) → (..., d)."""
    return ops.act_and_mul(gate_up, gelu_tanh=False)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation of GELU, as Gemma uses."""
    return ops.act_and_mul(gate_up, gelu_tanh=True)


ACTIVATIONS = {
    "silu": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
    "gelu": gelu_tanh_and_mul,  # Gemma configs say "gelu" but mean the tanh approximation
}


def get_act_and_mul(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden activation {name!r}") from None
