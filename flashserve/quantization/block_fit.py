"""Weighted least-squares fits of one block of weights to an integer grid, vectorized over blocks:
the scale (and minimum) search behind llama.cpp's K-quants and its importance-matrix legacy types.

Every fit minimises sum_i w_i (x_i - q(x_i))^2 over a few candidate grids: for a candidate inverse
scale the codes are rounded, then the scale (and minimum) that minimise the weighted error for
those codes are solved in closed form, and the candidate with the smallest error is kept. The
weights w_i say how much an error in weight i costs: |x_i| plus a floor without an importance
matrix, the mean squared activation of its input column times that with one (gguf_encode.py).

Arrays: x, w are (B, n) float32, one block per row; codes come back as (B, n) int32.
"""
from __future__ import annotations

import numpy as np

_EPS = 1e-15  # below this a block counts as all zero


def fit_affine(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float = -0.9, rdelta: float = 0.05,
               steps: int = 36) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x ~ scale * L - offset with L in [0, nmax], offset >= 0 (the grid always reaches 0 or below).
    Returns scale (B,), offset (B,), codes L (B, n).

    Candidates: the min-max grid, then inverse scales (nmax + rmin + rdelta * k) / (max - min) for
    k = 0..steps, each followed by the weighted least-squares (scale, min) for its codes: solving
    d/d(scale), d/d(min) of sum w (scale L + min - x)^2 = 0 (the normal equations of a line fit);
    a positive min is clamped to 0 and the scale refitted alone."""
    lo = np.minimum(x.min(1), 0)  # (B,)
    span = x.max(1) - lo
    flat = span <= 0
    span = np.where(flat, 1, span)
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)
    shifted = x - lo[:, None]

    codes = np.clip(np.rint(shifted * (nmax / span)[:, None]), 0, nmax)
    scale, low = span / nmax, lo
    best = (w * (scale[:, None] * codes + low[:, None] - x) ** 2).sum(1)
    for k in range(steps + 1):
        iscale = (rmin + rdelta * k + nmax) / span
        cand = np.clip(np.rint(shifted * iscale[:, None]), 0, nmax)
        sl, sl2, sxl = (w * cand).sum(1), (w * cand * cand).sum(1), (w * cand * x).sum(1)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1)
        c_scale = (sum_w * sxl - sum_x * sl) / det
        c_low = (sl2 * sum_x - sl * sxl) / det
        pos = c_low > 0
        c_low = np.where(pos, 0, c_low)
        c_scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), c_scale)
        err = (w * (c_scale[:, None] * cand + c_low[:, None] - x) ** 2).sum(1)
        take = ok & (err < best)
        best = np.where(take, err, best)
        scale, low = np.where(take, c_scale, scale), np.where(take, c_low, low)
        codes = np.where(take[:, None], cand, codes)
    scale = np.where(flat, 0, scale)
    codes = np.where(flat[:, None], 0, codes)
    return scale.astype(np.float32), (-low).astype(np.float32), codes.astype(np.int32)


def fit_symmetric(x: np.ndarray, w: np.ndarray, nmax: int, steps: int = 9) -> tuple[np.ndarray, np.ndarray]:
    """x ~ scale * L with L in [-nmax, nmax - 1]. Returns scale (B,) (signed) and L (B, n).

    The largest-magnitude weight is put on -nmax (the grid's long end), then inverse scales
    -(nmax + 0.1 k) / x_max for k in -steps..steps are tried; for fixed codes the best scale is
    sum w x L / sum w L^2 and its error falls with (sum w x L)^2 / sum w L^2, which picks the best."""
    rows = np.arange(x.shape[0])
    peak = x[rows, np.abs(x).argmax(1)]  # (B,) signed
    zero = np.abs(peak) < _EPS
    peak = np.where(zero, 1, peak)
    best_q = np.full(x.shape[0], -1.0, dtype=np.float64)
    scale = np.zeros(x.shape[0], dtype=np.float64)
    codes = np.zeros(x.shape, dtype=np.float32)
    for k in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * k) / peak
        cand = np.clip(np.rint(x * iscale[:, None]), -nmax, nmax - 1)
        slx = (w * x * cand).sum(1, dtype=np.float64)
        sl2 = (w * cand * cand).sum(1, dtype=np.float64)
        good = sl2 > 0
        quality = np.where(good, slx * slx / np.where(good, sl2, 1), -1)
        take = good & (quality > best_q)
        best_q = np.where(take, quality, best_q)
        scale = np.where(take, slx / np.where(good, sl2, 1), scale)
        codes = np.where(take[:, None], cand, codes)
    scale = np.where(zero, 0, scale)
    codes = np.where(zero[:, None], 0, codes)
    return scale.astype(np.float32), codes.astype(np.int32)


def fit_positive(v: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The sub-block scales (or offsets) v >= 0 of a K-quant super-block as d * L with L in [0, nmax]
    (6-bit: nmax 63), weighted by each sub-block's total weight. Returns d (B,) and L (B, n).

    Inverse scales (nmax + 0.1 k) / max(v), k = -4..4, are tried; then d is refitted by weighted
    least squares for the chosen codes."""
    peak = v.max(1)
    zero = peak <= 0
    peak = np.where(zero, 1, peak)
    best = np.full(v.shape[0], np.inf)
    codes = np.zeros(v.shape, dtype=np.float32)
    for k in range(-4, 5):
        iscale = (nmax + 0.1 * k) / peak
        cand = np.minimum(np.rint(v * iscale[:, None]), nmax)
        err = (w * (v - cand / iscale[:, None]) ** 2).sum(1)
        take = err < best
        best = np.where(take, err, best)
        codes = np.where(take[:, None], cand, codes)
    sl2 = (w * codes * codes).sum(1)
    d = np.where(sl2 > 0, (w * v * codes).sum(1) / np.where(sl2 > 0, sl2, 1), 0)
    d = np.where(zero, 0, d)
    return d.astype(np.float32), codes.astype(np.int32)
