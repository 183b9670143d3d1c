"""Gated MLP activations: act(gate) * up on a fused [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashserve.attention.cpu_kernels import kernels_for


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020). gate_up: (..., 2 * d) → (..., d)."""
    kernels = kernels_for(gate_up)
    if kernels is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return kernels.act_and_mul(gate_up, False)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation of GELU, as Gemma uses."""
    kernels = kernels_for(gate_up)
    if kernels is not None and gate_up.dim() == 2 and gate_up.stride(1) == 1:
        return kernels.act_and_mul(gate_up, True)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


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
