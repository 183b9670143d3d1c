"""AWQ's scale search (flashserve/quantization/awq.py) against errors measured outside it."""
from __future__ import annotations

import torch
from torch import nn

from flashserve.quantization import awq
from flashserve.quantization.rtn import fake_quantize


def _salient_inputs(gen, tokens=512, k=128):
    """Inputs whose channels differ in size by up to 20x, a few of them much larger: AWQ's setting."""
    scale = torch.rand(k, generator=gen) + 0.1
    scale[torch.randperm(k, generator=gen)[:4]] *= 20
    return torch.randn(tokens, k, generator=gen) * scale


def test_scale_search_beats_plain_rounding_on_salient_channels_and_restores_the_weights():
    gen = torch.Generator().manual_seed(1)
    x = _salient_inputs(gen)
    linears = [nn.Linear(128, 32, bias=False), nn.Linear(128, 16, bias=False)]
    for m in linears:
        m.weight.data = torch.randn(m.out_features, 128, generator=gen) * 0.02
    originals = [m.weight.data.clone() for m in linears]

    def block():  # a small nonlinear block over the two outputs, as a layer would be
        a, b = (m(x) for m in linears)
        return torch.tanh(a[:, :16] * 4) * b + a[:, 16:]

    ref = block()
    s, alpha, ratio = awq.search_scale(x, linears, block, 32)
    assert all(torch.equal(m.weight.data, w) for m, w in zip(linears, originals))

    def error(scale):  # the block with its weights rounded after scaling, computed here
        for m, w in zip(linears, originals):
            m.weight.data = fake_quantize(w * scale, 32, sym=False) / scale
        out = block()
        for m, w in zip(linears, originals):
            m.weight.data = w.clone()
        return (out - ref).pow(2).mean().item()

    plain = error(torch.ones(128))
    assert 0 < alpha < 1 and error(s) < 0.8 * plain
    assert abs(error(s) / plain - ratio) < 1e-4
    candidates = [x.abs().mean(0).pow(a / awq.GRID) for a in range(awq.GRID)]
    assert error(s) <= min(error(c / (c.max() * c.min()).sqrt()) for c in candidates) * (1 + 1e-5)
