"""Pipeline parallelism wrapped around a loaded model: rank s of P keeps a run of decoder layers
(GPipe's split, Huang et al. 2019), the others become pass-throughs. The runs balance the bytes of
the stages' layers (a file mixing quantization types has layers of several sizes), since the slowest
stage sets the pace once micro-batches overlap. The LM head is not counted: it computes one row per
sequence, nothing for a prompt's other tokens, and weighing its bytes fully (SmolLM2's are worth 7 of
its 30 layers) left the first stage the busier in decode and cost prompts a tenth (measured).

Stage s > 0 receives the (hidden, residual) pair from stage s - 1 before its first layer; stage
s < P - 1 sends its pair after its last, without waiting for it to be received, and goes on to its
next step. Every rank
runs the same steps (same SchedulerOutputs, in the same order); the last stage's logits are the
real ones, so it samples and answers, and the others' LM head yields zeros instead of spending a
vocabulary-sized product.

A step passes the stages one after another; the engine keeps one step in flight per stage, each
over its own micro-batch of requests (EngineConfig.steps_in_flight), so that the stages overlap.
With one step in flight each rank would idle (P - 1) / P of the time. Each rank holds 1 / P of the
layers and of the KV cache. Llama-family blocks only (pre-norm with a residual stream); Gemma 3's
sandwich blocks pass no residual and are refused.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.distributed as dist
from torch import nn

from flashserve.config import ModelConfig

PP_ARCHITECTURES = ("llama", "qwen2")


def balanced_stages(layer_costs: list[float], stages: int) -> list[tuple[int, int]]:
    """[first, stop) of each stage's layers: contiguous runs of at least one layer that minimize the
    largest stage cost (a linear partition, by dynamic programming over the split points)."""
    n = len(layer_costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers into {stages} stages of at least one layer")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: the least largest cost of splitting layers [0, i) into k stages; cut[k][i]: its last split
    best = [[float("inf")] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, stop = [], n
    for k in range(stages, 0, -1):
        bounds.append((cut[k][stop], stop))
        stop = cut[k][stop]
    return bounds[::-1]


def layer_bytes(model: nn.Module) -> list[float]:
    """Bytes each decoder layer holds: what a decode step reads of it."""
    return [float(sum(t.nbytes for t in itertools.chain(layer.parameters(), layer.buffers())))
            for layer in model.model.layers]


def split_stages(model: nn.Module, stage: int, stages: int) -> ModelConfig:
    """Cut `model` (loaded whole) down to stage `stage`'s layers, in place, and hook the transfers.
    Returns the stage's ModelConfig (its layer count) for its KV cache."""
    cfg = model.config
    if cfg.architecture not in PP_ARCHITECTURES:
        raise ValueError(f"pipeline parallelism takes {', '.join(PP_ARCHITECTURES)} models, not {cfg.architecture}")
    first, stop = balanced_stages(layer_bytes(model), stages)[stage]
    layers = model.model.layers
    for i in range(cfg.num_layers):
        if not first <= i < stop:
            layers[i] = PassThrough()
    if stage > 0:
        layers[first] = ReceiveBefore(layers[first], stage - 1, cfg.hidden_size)
    if stage < stages - 1:
        layers[stop - 1] = SendAfter(layers[stop - 1], stage + 1)
        model.lm_head = ZeroLogits(cfg.vocab_size)  # only the last stage's logits are used
    return dataclasses.replace(cfg, num_layers=stop - first)


class PassThrough(nn.Module):
    """A layer another stage runs."""

    def forward(self, positions, x, residual, meta):
        return x, residual


class ReceiveBefore(nn.Module):
    def __init__(self, layer: nn.Module, src: int, hidden_size: int):
        super().__init__()
        self.layer, self.src, self.hidden_size = layer, src, hidden_size

    def forward(self, positions, x, residual, meta):
        pair = torch.empty(2, x.shape[0], self.hidden_size, dtype=x.dtype)  # (hidden | residual, T, d)
        dist.recv(pair, src=self.src)
        return self.layer(positions, pair[0], pair[1], meta)


class SendAfter(nn.Module):
    def __init__(self, layer: nn.Module, dst: int):
        super().__init__()
        self.layer, self.dst = layer, dst
        self._sending = None  # (work, tensor) of the previous step's send: the tensor lives until it is done

    def forward(self, positions, x, residual, meta):
        x, residual = self.layer(positions, x, residual, meta)
        if self._sending is not None:
            self._sending[0].wait()  # long done, normally: the next stage took it when it began that step
        pair = torch.stack([x, residual]).contiguous()  # (2, T, d)
        self._sending = (dist.isend(pair, dst=self.dst), pair)
        return x, residual


class ZeroLogits(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(hidden.shape[0], self.vocab_size)
