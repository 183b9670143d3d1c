"""Hot/cold FFN neurons (PowerInfer, Song et al. 2023): each layer's intermediate neurons ordered by
how often the profile saw them active (offload/neuron_profile.py), the hot ones first, and a
low-rank predictor (offload/neuron_predictor.py) that skips the cold neurons it predicts inactive.

A permutation P of the intermediate dimension leaves a gated MLP's output unchanged:
    D a(G x, U x) = (D P^T) a(P G x, P U x)      (a acts elementwise on the neurons)
so the permuted weights hold the same function; HotColdMLP splits them into the hot rows (always
computed) and the cold rows (gathered and computed only where some token of the step is predicted
to activate them; one set per step, the union over its tokens).

    hot_gate_up   (2h, d)       gate rows of the h hot neurons, then their up rows
    hot_down      (d, h)
    cold_gate_up  (I - h, 2, d) each cold neuron's gate and up row together: one gather per neuron
    cold_down_t   (I - h, d)    down's cold columns as rows, for the same gather

Exact or off: a model whose greedy tokens on a few prompts change under skipping by more than
max_disagreement (default 0: any change) runs dense, its MLPs restored bit for bit, with a warning.
Without the predictor nothing is placed: on one CPU both tiers are the same memory, and the dense
MLP is what runs (bit-identical to a model loaded without a profile).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.errors import FlashserveError
from flashserve.model.layers.activation import get_act_and_mul
from flashserve.model.models.llama import GatedMLP
from flashserve.offload.neuron_predictor import predictor_logits
from flashserve.offload.neuron_profile import NeuronProfile, down_weight

logger = logging.getLogger(__name__)

CHECK_TOKENS = 16  # greedy tokens after each of the profile's check prompts, with and without skipping


def hot_first_order(active_counts: torch.Tensor) -> torch.Tensor:
    """(I,) neuron indices, most often active first (ties in index order)."""
    return torch.sort(active_counts, descending=True, stable=True).indices


class HotColdMLP(nn.Module):
    def __init__(self, mlp: GatedMLP, hidden_act: str, order: torch.Tensor, num_hot: int,
                 predictor: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None):
        """predictor: (A (d, r), B (r, I), bias (I,), cutoff) in the unpermuted neuron order; None
        computes every cold neuron (the placement alone)."""
        super().__init__()
        w, down = mlp.gate_up_proj.weight.data, down_weight(mlp).data  # (2I, d), (d, I)
        size, h = down.shape[1], num_hot
        gate, up, down = w[:size][order], w[size:][order], down[:, order]
        self.order, self.num_hot = order, h
        self.register_buffer("hot_gate_up", torch.cat([gate[:h], up[:h]]), persistent=False)  # (2h, d)
        self.register_buffer("hot_down", down[:, :h].contiguous(), persistent=False)  # (d, h)
        self.register_buffer("cold_gate_up", torch.stack([gate[h:], up[h:]], dim=1), persistent=False)  # (I-h, 2, d)
        self.register_buffer("cold_down_t", down[:, h:].t().contiguous(), persistent=False)  # (I - h, d)
        self.act_and_mul = get_act_and_mul(hidden_act)
        self.predictor = None
        if predictor is not None:
            a, b, bias, cutoff = predictor
            cold = order[h:]
            self.predictor = (a.to(w.dtype), b[:, cold].to(w.dtype).contiguous(), bias[cold].to(w.dtype), cutoff)
        self.cold_computed = 0  # cold neurons computed, summed over steps (for benchmarks)
        self.steps = 0

    @property
    def num_cold(self) -> int:
        return self.cold_down_t.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, d) → (T, d)."""
        y = F.linear(self.act_and_mul(F.linear(x, self.hot_gate_up)), self.hot_down)  # (T, d)
        if self.predictor is None:
            keep = None
        else:
            a, b, bias, cutoff = self.predictor
            keep = (predictor_logits(x, a, b, bias) > cutoff).any(0).nonzero().squeeze(1)  # (n,) cold rows
        rows = self.cold_gate_up if keep is None else self.cold_gate_up[keep]  # (n, 2, d)
        down_t = self.cold_down_t if keep is None else self.cold_down_t[keep]  # (n, d)
        self.cold_computed += rows.shape[0]
        self.steps += 1
        if rows.shape[0]:
            gu = F.linear(x, rows.view(-1, rows.shape[-1])).view(x.shape[0], -1, 2)  # (T, n, [gate, up])
            # [gate | up] halves for the same activation kernel as the hot part's
            y = y + self.act_and_mul(torch.cat([gu[..., 0], gu[..., 1]], dim=1)) @ down_t
        return y

    def dense(self, cfg) -> GatedMLP:
        """The GatedMLP this was built from, its weights in their original order (exact copies)."""
        h = self.num_hot
        inverse = torch.argsort(self.order)
        gate = torch.cat([self.hot_gate_up[:h], self.cold_gate_up[:, 0]])[inverse]  # (I, d)
        up = torch.cat([self.hot_gate_up[h:], self.cold_gate_up[:, 1]])[inverse]  # (I, d)
        down = torch.cat([self.hot_down, self.cold_down_t.t()], dim=1)[:, inverse]  # (d, I)
        with torch.device("meta"):
            mlp = GatedMLP(cfg)
        mlp.gate_up_proj.weight = nn.Parameter(torch.cat([gate, up]), requires_grad=False)
        mlp.down_proj.weight = nn.Parameter(down.contiguous(), requires_grad=False)
        return mlp


def place(model, profile: NeuronProfile, hot_fraction: float, use_predictor: bool) -> list[HotColdMLP]:
    """Put a HotColdMLP in every decoder layer's place (with the profile's predictor when asked)."""
    check_profile_fits(model, profile)
    cfg = model.config
    num_hot = round(hot_fraction * profile.intermediate_size)
    p = profile.predictor
    placed = []
    for i, layer in enumerate(model.model.layers):
        predictor = (p["a"][i], p["b"][i], p["bias"][i], float(p["cutoff"][i])) if use_predictor else None
        layer.mlp = HotColdMLP(layer.mlp, cfg.hidden_act, hot_first_order(profile.active_counts[i]), num_hot,
                               predictor)
        placed.append(layer.mlp)
    return placed


def unplace(model) -> None:
    """Every HotColdMLP back to its dense GatedMLP."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, HotColdMLP):
            layer.mlp = layer.mlp.dense(model.config)


def check_profile_fits(model, profile: NeuronProfile) -> None:
    cfg = model.config
    if (profile.architecture, profile.num_layers, profile.intermediate_size) != (
            cfg.architecture, cfg.num_layers, cfg.intermediate_size):
        raise FlashserveError(
            f"the neuron profile is of a {profile.architecture} model with {profile.num_layers} layers of "
            f"{profile.intermediate_size} neurons (from {profile.meta.get('model', '?')}); this model is "
            f"{cfg.architecture} with {cfg.num_layers} layers of {cfg.intermediate_size}")


def greedy_tokens(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, each step prefilling the whole sequence again (a short check:
    no scheduler, no cache reuse, the same forward as the engine's)."""
    from flashserve.quantization.calibrate import engine_prefill, own_kv_cache

    seq = list(prompt)
    with own_kv_cache(model, model.config, len(prompt) + n):
        for _ in range(n):
            hidden = engine_prefill(model, seq)
            seq.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return seq[len(prompt):]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Fraction of the reference's tokens reproduced before the first divergence, over all prompts
    (after a divergence the two continue from different text, so later matches do not count)."""
    matched = 0
    for ref, got in zip(reference, candidate):
        for r, g in zip(ref, got):
            if r != g:
                break
            matched += 1
    return matched / max(1, sum(len(r) for r in reference))


def apply_hot_neurons(model, options) -> float | None:
    """Load options.profile; with options.predictor place every layer's neurons and keep the skipping
    only if greedy agreement on the profile's check prompts (runs of its calibration tokens) stays
    within 1 - max_disagreement of dense. Returns that agreement (None when the predictor is off:
    nothing is placed)."""
    profile = NeuronProfile.load(options.profile)
    check_profile_fits(model, profile)
    if not options.predictor:
        logger.info("hot_neuron_profile without the predictor: the MLPs run dense (nothing to skip)")
        return None
    if profile.predictor is None:
        raise FlashserveError(f"{options.profile} has no trained predictor: write the profile with "
                              "flashserve profile-neurons --predictor-rank R")
    prompts = profile.check_prompts
    if not prompts:
        raise FlashserveError(f"{options.profile} has no check prompts for the exactness check: write it again "
                              "with flashserve profile-neurons")
    dense = [greedy_tokens(model, p, CHECK_TOKENS) for p in prompts]
    place(model, profile, options.hot_fraction, use_predictor=True)
    agreed = agreement(dense, [greedy_tokens(model, p, CHECK_TOKENS) for p in prompts])
    if 1.0 - agreed > options.max_disagreement:
        unplace(model)
        logger.warning("neuron predictor off: skipping predicted-inactive cold neurons changed %.0f%% of greedy "
                       "tokens on %d check prompts (allowed %.0f%%); the model runs dense",
                       100 * (1 - agreed), len(prompts), 100 * options.max_disagreement)
    else:
        logger.info("neuron predictor on: greedy agreement with dense %.3f on %d check prompts", agreed, len(prompts))
    return agreed
