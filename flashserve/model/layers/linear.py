"""Linear layers. Weights are (out_features, in_features) like nn.Linear.

`MergedLinear` holds several projections that read the same input (q|k|v, gate|up)
as one weight so a step does one GEMM instead of several; the loader fills its parts
by name through `load_part`.

A quantized checkpoint swaps the float weight for a packed one (flashserve/quantization):
`set_quantized` drops `weight` and the forward runs the packed weight's kernel instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.qweight: nn.Module | None = None  # x (..., in) → (..., out) when the weight is packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            return F.linear(x, self.weight, self.bias)
        y = self.qweight(x)
        return y if self.bias is None else y + self.bias

    def set_quantized(self, qweight: nn.Module) -> None:
        if (qweight.out_features, qweight.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"packed weight is {qweight.out_features}x{qweight.in_features}, "
                             f"layer is {self.out_features}x{self.in_features}")
        self.weight = None  # the float weight's memory was never touched; it goes now
        self.qweight = qweight


class MergedLinear(Linear):
    def __init__(self, in_features: int, part_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(part_sizes.values()), bias)
        self.part_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in part_sizes.items():
            self.part_offsets[name] = (start, size)
            start += size

    def load_part(self, part: str, kind: str, tensor: torch.Tensor) -> None:
        start, size = self.part_offsets[part]
        target = self.weight if kind == "weight" else self.bias
        if target is None:
            raise ValueError(f"{part}.{kind}: this layer has no {kind}")
        if tensor.shape[0] != size or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"{part}.{kind}: expected {(size, *target.shape[1:])}, got {tuple(tensor.shape)}")
        target.data[start : start + size].copy_(tensor)

    def part_weight(self, part: str) -> torch.Tensor:
        """The float rows of one part (after load_part)."""
        start, size = self.part_offsets[part]
        return self.weight.data[start : start + size]

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return list(y.split([size for _, size in self.part_offsets.values()], dim=-1))
