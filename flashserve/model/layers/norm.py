"""RMSNorm (Zhang & Sennrich 2019): statistics in float32 whatever the compute dtype."""
from __future__ import annotations

import torch
from torch import nn

from flashserve.attention.cpu_kernels import kernels_for


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
        kernels = kernels_for(x)
        if kernels is not None and x.dim() in (2, 3) and x.stride(-1) == 1:
            return kernels.rms_norm(x, self.weight, self.eps)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block input: (norm(x + residual), x + residual)."""
        kernels = kernels_for(x)
        if kernels is not None and x.dim() == 2 and x.is_contiguous() and residual.is_contiguous():
            residual = residual.clone() if residual._base is not None else residual  # never write into a view
            return kernels.add_rms_norm_(x, residual, self.weight, self.eps), residual
        residual = x + residual
        return self.forward(residual), residual
