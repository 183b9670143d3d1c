"""RMSNorm (Zhang & Sennrich 2019): statistics in float32 whatever the compute dtype."""
from __future__ import annotations

import torch
from torch import nn

from flashserve.kernels import ops


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight.

    `weight` is the full multiplier. Gemma stores (weight - 1) in its HF checkpoints
    and multiplies by (1 + weight); its loader adds the 1 once, so the forward is shared.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block input: (norm(x + residual), x + residual)."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
