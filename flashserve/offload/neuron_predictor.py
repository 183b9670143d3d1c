"""Which FFN neurons will a token activate? A low-rank predictor per layer, as in Deja Vu (Liu et al.
2023, section 4.2) and PowerInfer (Song et al. 2023, section 5.1):

    logits = (x A) B + b        x: (T, d)  A: (d, r)  B: (r, I)  b: (I,)  →  (T, I)

trained on the profile's pairs (MLP input, activity mask; offload/neuron_profile.py) with binary
cross-entropy, the active class weighted by how rare it is. Each layer's logit cutoff is then set
so that `target_recall` of the active (token, neuron) pairs of the training tokens are predicted
active: a missed active neuron is an error in the output, a false alarm only costs its compute.
Recall is reported on held-out tokens (the last `held_out` of them, never trained on).
"""
from __future__ import annotations

import torch

DEFAULT_RANK = 32
TRAIN_STEPS = 150
TARGET_RECALL = 0.99


def predictor_logits(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (T, d) → per-neuron active logits (T, I)."""
    return torch.addmm(bias, x @ a, b)


def train_predictors(samples: list[tuple[torch.Tensor, torch.Tensor]], rank: int = DEFAULT_RANK,
                     steps: int = TRAIN_STEPS, target_recall: float = TARGET_RECALL, held_out: float = 0.2,
                     seed: int = 0) -> dict:
    """samples: per layer (x (N, d), active (N, I) bool). Returns the stacked weights A (L, d, r),
    B (L, r, I), bias (L, I), cutoff (L,), and per layer the held-out recall and the fraction of
    neurons predicted active, as plain tensors (they are saved in the profile)."""
    if rank < 1:
        raise ValueError(f"the predictor's rank must be at least 1, got {rank}")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {k: [] for k in ("a", "b", "bias", "cutoff", "recall", "predicted_active")}
    for x, active in samples:
        x, y = x.float().clone(), active.float().clone()  # plain tensors (the profile ran in inference mode)
        n_train = max(1, int(len(x) * (1 - held_out)))
        a, b, bias = _fit(x[:n_train], y[:n_train], rank, steps, gen)
        with torch.no_grad():
            train_logits = predictor_logits(x[:n_train], a, b, bias)
            positive = train_logits[y[:n_train].bool()]
            # the cutoff below which only 1 - target_recall of the active pairs' logits lie
            cutoff = torch.quantile(positive[:1 << 24], 1 - target_recall) if positive.numel() else torch.tensor(0.0)
            test_x, test_y = (x[n_train:], y[n_train:].bool()) if n_train < len(x) else (x, y.bool())
            predicted = predictor_logits(test_x, a, b, bias) > cutoff
            recall = (predicted & test_y).sum() / test_y.sum().clamp_min(1)
        for k, v in zip(out, (a.detach(), b.detach(), bias.detach(), cutoff, recall, predicted.float().mean())):
            out[k].append(v)
    stacked = {k: torch.stack(v) for k, v in out.items()}
    return {"rank": rank, "target_recall": target_recall, **stacked}


def _fit(x: torch.Tensor, y: torch.Tensor, rank: int, steps: int, gen: torch.Generator):
    d, size = x.shape[1], y.shape[1]
    a = (torch.randn(d, rank, generator=gen) / d**0.5).requires_grad_()
    b = (torch.randn(rank, size, generator=gen) / rank**0.5).requires_grad_()
    rate = y.mean().clamp(1e-4, 1 - 1e-4)
    bias = torch.full((size,), float(torch.log(rate / (1 - rate)))).requires_grad_()
    pos_weight = ((1 - rate) / rate).clamp(max=10.0)  # active pairs weigh as much as inactive ones, within 10x
    opt = torch.optim.Adam([a, b, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(predictor_logits(x, a, b, bias), y,
                                                                       pos_weight=pos_weight)
            loss.backward()
            opt.step()
    return a, b, bias
