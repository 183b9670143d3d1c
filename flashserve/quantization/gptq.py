"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers"), 4-bit, symmetric, in groups along the input.

For a linear W (N, K) whose inputs X (K, T) come from calibration text, GPTQ minimises
||W X - W' X||^2 one input column at a time (the Optimal Brain Quantization step, eq. 2-3):
column k is rounded to its grid, and its error, divided by [H^-1]_kk, is spread over the columns
not yet quantized along row k of H^-1, with H = 2 X X^T the layer-wise Hessian. The paper's three
changes make this fast and stable (section 4, Algorithm 1):
  - every row of W uses the same column order, so H^-1 is shared by all rows;
  - updates are applied lazily in blocks of B = 128 columns (one rank-B update per block);
  - H^-1's upper Cholesky factor replaces the repeated inverse updates, after dampening H by
    1% of its mean diagonal.
With act-order (desc_act) columns go in order of decreasing diag(H) (largest activations first) and
groups are formed along that order, so g_idx maps each original column to its group.
"""
from __future__ import annotations

import torch

from flashserve.quantization.int4_format import Int4Groups, check_group
from flashserve.quantization.rtn import fit_clipped_grid, fit_grid, quantize

BLOCK = 128  # columns per lazy batch update (Algorithm 1's B)
DAMP = 0.01  # λ = 1% of the mean diagonal of H


class Hessian:
    """Running H = 2/T sum_t x_t x_t^T over calibration rows (float64 accumulator, (K, K))."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.h.shape[0]).double()  # (T, K)
        t = x.shape[0]
        self.h.mul_(self.rows / (self.rows + t)).addmm_(x.t(), x, alpha=2.0 / (self.rows + t))
        self.rows += t


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group: int, act_order: bool = False,
                  clip: bool = False) -> Int4Groups:
    """w (N, K), h (K, K) → 4-bit codes, float16 scales and g_idx minimising the error on h's inputs;
    clip: each group's grid from rtn.fit_clipped_grid's search, not its whole range."""
    n, k = w.shape
    check_group(group, k)
    if BLOCK % group:
        raise ValueError(f"group size {group} must divide GPTQ's block of {BLOCK} columns")
    w = w.double().clone()
    h = h.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(DAMP * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # U, H^-1 = U^T U

    codes = torch.zeros(n, k)
    scales, zeros = torch.zeros(n, k // group), torch.zeros(n, k // group)
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        wb = w[:, b0:b1].clone()  # (N, B) this block, updated column by column
        err = torch.zeros_like(wb)  # (N, B) scaled errors, for the block's lazy update
        u = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:  # the grid of a group is fitted on its columns as updated so far
                s, z = (fit_clipped_grid if clip else fit_grid)(wb[:, i : i + group].float(), sym=True)
                scales[:, col // group], zeros[:, col // group] = s, z
            s, z = scales[:, col // group], zeros[:, col // group]
            q = quantize(wb[:, i : i + 1].float(), s, z)[:, 0]
            codes[:, col] = q
            e = (wb[:, i] - ((q - z) * s).double()) / u[i, i]
            wb[:, i:] -= e[:, None] * u[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]

    restore = torch.argsort(order)
    g_idx = (torch.arange(k) // group)[restore]  # group of each original column
    return Int4Groups(codes[:, restore].to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, group)
