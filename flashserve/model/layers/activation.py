"""Gated MLP activations: act(gate) * up on a fused [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from flashserve.attention.cpu_kernels import kernels_for


def _fused(gate_up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor | None:
    """The C++ kernel's result when it applies (CPU, (T, 2d) with contiguous rows), else None."""
    kernels = kernels_for(gate_up)
    if kernels is None or gate_up.dim() != 2 or gate_up.stride(1) != 1:
        return None
    return kernels.act_and_mul(gate_up, gelu_tanh)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (Shazeer 2020). gate_up: (..., 2 * d) → (..., d)."""
    out = _fused(gate_up, gelu_tanh=False)
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh approximation of GELU, as Gemma uses."""
    out = _fused(gate_up, gelu_tanh=True)
    if out is not None:
        return out
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
