"""Round-to-nearest 4-bit group quantization: the grid GPTQ and AWQ quantize onto, and the baseline
they are measured against.

A group of g weights w gets a float16 scale s and an integer zero z in 0..15, and

    q = clamp(round(w / s) + z, 0, 15),   w' = (q - z) * s
    symmetric (GPTQ's sym):   s = 2 max|w| / 15, z = 8
    asymmetric (AWQ's zero_point): s = (max w - min w) / 15, z = round(-min w / s), over a range that holds 0

s is rounded to float16 first (the checkpoints store it so), and the codes are taken against that s.
"""
from __future__ import annotations

import torch

from flashserve.quantization.int4_format import Int4Groups, check_group

MAXQ = 15
_TINY = 1e-7  # an all-zero group still gets a positive (float16-representable) scale


def fit_grid(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., g) → scale (...,) float32 holding float16 values, zero (...,) float32 integers."""
    if sym:
        s = (w.abs().amax(-1) * (2 / MAXQ)).clamp_min(_TINY).half().float()
        return s, torch.full_like(s, (MAXQ + 1) // 2)
    lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
    s = ((hi - lo) / MAXQ).clamp_min(_TINY).half().float()
    return s, torch.round(-lo / s).clamp(0, MAXQ)


# Clipping: the grid of the group's range shrunk to each of these fractions is tried, and the one with
# the least sum |w - w'|^CLIP_NORM kept (a finer step for most weights against a clipped few). The power
# 2.4, between the mean square error and the largest error, is the GPTQ authors' reference code's.
CLIP_FRACTIONS = tuple(f / 100 for f in range(100, 74, -1))
CLIP_NORM = 2.4


def fit_clipped_grid(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_grid of w's range shrunk by the CLIP_FRACTIONS factor that rounds w (..., g) best, per group
    (the first such factor on a tie)."""
    def fitted(fraction: float):
        s, z = fit_grid(w * fraction, sym)  # the range of w scaled is the range scaled
        return s, z, (round_on_grid(w, s, z) - w).abs().pow(CLIP_NORM).sum(-1)

    s, z, err = fitted(CLIP_FRACTIONS[0])
    for fraction in CLIP_FRACTIONS[1:]:
        s_f, z_f, err_f = fitted(fraction)
        better = err_f < err
        s, z, err = torch.where(better, s_f, s), torch.where(better, z_f, z), torch.where(better, err_f, err)
    return s, z


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes of w (..., g) on the grid of (scale, zero) (...,): float32 integers in 0..15."""
    return torch.round(w / scale[..., None] + zero[..., None]).clamp_(0, MAXQ)


def round_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w (..., g) rounded to the nearest value of the grid of (scale, zero) (...,)."""
    return (quantize(w, scale, zero) - zero[..., None]) * scale[..., None]


def fake_quantize(w: torch.Tensor, group: int, sym: bool) -> torch.Tensor:
    """w (N, K) rounded to its 4-bit grid per group of `group` columns, as float32 (N, K)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    return round_on_grid(wg, *fit_grid(wg, sym)).reshape(n, k)


def rtn_quantize(w: torch.Tensor, group: int, sym: bool) -> Int4Groups:
    """w (N, K) → its round-to-nearest 4-bit form in groups of `group` consecutive columns."""
    n, k = w.shape
    check_group(group, k)
    wg = w.float().reshape(n, k // group, group)
    s, z = fit_grid(wg, sym)
    codes = quantize(wg, s, z).reshape(n, k)
    return Int4Groups(codes.to(torch.uint8), s, z.to(torch.uint8), torch.arange(k) // group, group)
