"""AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration"), 4-bit with zero points, in groups along the input.

Weights that meet large activations matter most (section 3.1). Instead of keeping them in float, AWQ
scales input channel k of a linear up by s_k before rounding and the input down by 1/s_k, which
shrinks the relative rounding error of the salient channels (section 3.2, eq. 4-5):

    s = s_X^alpha,   s_X = mean_t |x_tk|   (per input channel),   alpha on a grid in [0, 1)

searched once for the linears that read the same input (q|k|v; gate|up; down). diag(s)^-1 is folded
into whatever produced X (the RMSNorm's weight, or the rows of the previous linear), so inference runs
the plain quantized weights. Q is round-to-nearest (rtn.py, asymmetric); alpha 0 is plain rounding.

Each alpha is scored, as the authors' released code scores it, by the error of the block's output
rather than of the linears' own: the decoder layer is run on calibration sequences with the group's
weights replaced by Q(W diag(s)) diag(s)^-1 (the rest of the layer in float) and compared with the
float layer's output. Scored on each linear's own output instead, the search chose larger alphas
that made Qwen2.5-Coder-0.5B's perplexity worse than plain rounding's (RESULTS.md, issue 17): an
error in q or k reaches the output through the softmax, and one in gate or up through the gating,
neither of which a linear's squared error weighs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flashserve.quantization.rtn import fake_quantize

GRID = 10  # alpha = 0, 0.1, ..., 0.9
SEARCH_SEQS = 4  # calibration sequences the layer is run on for each alpha


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Linear], run: Callable[[], torch.Tensor], group: int,
                 ) -> tuple[torch.Tensor, float, float]:
    """x (T, K) inputs shared by `linears`; run() the layer's output on the search sequences →
    (s (K,), alpha, the layer's output error at alpha / at alpha 0). The linears' weights are left as
    they were."""
    x_mean = x.float().abs().mean(0).clamp_min(1e-8)  # s_X (K,)
    originals = [m.weight.data.clone() for m in linears]
    ref = run()
    best = (float("inf"), None, 0.0)
    base = None
    try:
        for step in range(GRID):
            alpha = step / GRID
            s = x_mean.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()  # centred around 1 in log scale, so the grid's fp16 scales stay normal
            for m, w in zip(linears, originals):
                m.weight.data.copy_(fake_quantize(w * s, group, sym=False) / s)
            err = (run() - ref).float().pow(2).mean().item()
            base = err if base is None else base
            if err < best[0]:
                best = (err, s, alpha)
    finally:
        for m, w in zip(linears, originals):
            m.weight.data.copy_(w)
    err, s, alpha = best
    return s, alpha, err / base if base else 1.0
