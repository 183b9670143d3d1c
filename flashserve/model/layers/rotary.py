"""Rotary position embedding (RoFormer, Su et al. 2021), "rotate half" layout as in HF checkpoints.

Frequencies can be rescaled: linear (position interpolation, Chen et al. 2023),
llama3 (Meta's per-band scaling of Llama 3.1), or explicit per-frequency divisors
(the `rope_freqs` tensor that GGUF files of Llama 3.1 carry).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from flashserve.kernels import ops


def inverse_frequencies(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (head_dim/2,)
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "freq_factors":
        return inv / torch.tensor(scaling["factors"], dtype=torch.float64)
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(mid, blended, out)
    raise ValueError(f"unsupported rope scaling {kind!r}")


_POSITIONS_PER_PIECE = 2048


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.inverse_frequencies = inverse_frequencies(head_dim, base, scaling)  # float64 (head_dim/2,)
        self.build_tables(max_positions)

    def build_tables(self, max_positions: int) -> None:
        """cos and sin of every position's angles, (max_positions, head_dim/2) float32: positions up to
        the context length need more than bf16's 8 bits. Angles in float64, a piece of positions at a
        time: whole-table float64 temporaries were 4x the tables (+130 MiB at start-up for Gemma 3's
        two 32k x 128 pairs, measured)."""
        inv = self.inverse_frequencies
        cos, sin = (torch.empty(max_positions, inv.numel(), dtype=torch.float32) for _ in range(2))
        for start in range(0, max_positions, _POSITIONS_PER_PIECE):
            positions = torch.arange(start, min(start + _POSITIONS_PER_PIECE, max_positions), dtype=torch.float64)
            angles = torch.outer(positions, inv)  # (piece, head_dim/2)
            cos[start:start + len(positions)] = angles.cos()
            sin[start:start + len(positions)] = angles.sin()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def __getstate__(self):
        """Pickled without its tables (model/weight_cache.py saves a model): they follow from the
        frequencies and the context length, which the loader passes to build_tables."""
        state = dict(super().__getstate__())  # a copy: the live module keeps its tables
        state["_buffers"] = {name: torch.empty(0) for name in state["_buffers"]}
        return state

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,); q: (T, Hq, D); k: (T, Hk, D). May rotate q and k in place."""
        return ops.rotary(positions, q, k, self.cos, self.sin)
