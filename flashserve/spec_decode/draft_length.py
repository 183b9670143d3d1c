"""Adaptive k: how many drafts each request is given next step, owned by the engine.

Every draft costs time whether it is accepted or not (the proposer's work and one more row for the
target to score), so a request whose drafts keep failing must stop drafting. With a per-draft
acceptance rate alpha, k drafts yield

    E(k) = (1 - alpha^(k+1)) / (1 - alpha)        tokens per step    (Leviathan et al. 2023, eq. 1)

at a cost of 1 + c*k plain steps, where c is one draft's cost as a fraction of a plain decode step
(their eq. 2 calls it c for a draft model). The k in 0..k_max with the largest E(k) / (1 + c*k) is
chosen; k = 0 (plain decoding) whenever no k beats 1.

    alpha = 0.29, c = 0.25:   k=0: 1.00   k=1: 1.03   k=2: 0.92   -> 1 draft
    alpha = 0.60, c = 0.25:   k=1: 1.28   k=2: 1.31   k=3: 1.25   -> 2 drafts
    alpha = 0.11, c = 0.50:   k=0: 1.00   k=1: 0.74               -> none

alpha is estimated per request from its own verifications only, so the choice (hence a seeded
request's random draws) depends on its own sequence, not on what it is batched with. A step with k
drafts of which a were accepted is a + [a < k] Bernoulli trials with a successes (acceptance stops at
the first rejection). Counts start at a prior and decay by DECAY per verification, so alpha follows
the text: a copied passage accepts everything, free prose little.

A request at k = 0 still probes with one draft every PROBE_INTERVAL steps, so that acceptance which
recovers (the output reaches a passage it copies) is noticed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flashserve.config import EngineConfig, SpeculativeConfig

PRIOR_ACCEPTANCE = 0.6  # a new request's alpha, before it has verified anything
PRIOR_TRIALS = 2.0  # weight of that prior, in trials; it fades with DECAY like any observation
DECAY = 0.85  # per verification: the estimate spans roughly the last 1 / (1 - DECAY) ~ 7 steps
PROBE_INTERVAL = 8  # steps a non-drafting request waits before trying one draft again


# One draft's cost as a fraction of a plain decode step, by method, when the draft model's weights
# do not say it: the target scoring one more row (and sampling it), plus the proposer's own work.
# Measured on 2 cores with benchmarks/draft_cost.py (RESULTS.md, adaptive k): prompt lookup 0.22-0.32
# on SmolLM2-135M and Qwen2.5-Coder-1.5B, EAGLE 0.85-0.88 on SmolLM2; a draft priced a little low or
# high moves the break-even acceptance by as much, so speculation stays near plain speed either way.
DRAFT_COST = {"ngram": 0.25, "medusa": 0.5, "eagle": 0.8}
VERIFY_COST = DRAFT_COST["ngram"]  # what a draft costs when proposing it is free


def estimate_draft_cost(config: EngineConfig) -> float:
    """c of the module docstring: the user's draft_cost, else the method's. A draft model's step reads
    its weights as the target's reads the target's (decoding is memory-bound), so it costs their
    size ratio (Leviathan et al.'s c), on top of the target's scoring."""
    spec = config.speculative
    if spec.draft_cost is not None:
        return spec.draft_cost
    if spec.method == "draft_model":
        return VERIFY_COST + _weight_bytes(spec.draft_model_path) / _weight_bytes(config.model_path)
    return DRAFT_COST.get(spec.method, 0.0)


def _weight_bytes(model_path: str) -> int:
    """A model's size on disk: its file, or the weight files of its directory."""
    path = Path(model_path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf")) or 1


def best_num_drafts(alpha: float, cost: float, k_max: int) -> int:
    """argmax over k in 0..k_max of E(k) / (1 + cost * k), E as in the module docstring."""
    best_k, best_speedup, expected, gain = 0, 1.0, 1.0, 1.0
    for k in range(1, k_max + 1):
        gain *= alpha  # alpha^k: the chance that draft k is reached and accepted
        expected += gain
        speedup = expected / (1.0 + cost * k)
        if speedup > best_speedup:
            best_k, best_speedup = k, speedup
    return best_k


@dataclass
class _Acceptance:
    successes: float = PRIOR_ACCEPTANCE * PRIOR_TRIALS
    trials: float = PRIOR_TRIALS
    steps_without_drafts: int = 0

    @property
    def alpha(self) -> float:
        return self.successes / self.trials


class DraftLength:
    """Per-request k for the next step. `adaptive` False: every request gets k_max, as configured.
    `disable_by_batch_size`: no request drafts while at least this many are running (vLLM's knob of
    the same name), where a step is compute-bound and a draft row costs as much as a plain token."""

    def __init__(self, spec: SpeculativeConfig, draft_cost: float):
        self.k_max = spec.num_speculative_tokens
        self.adaptive = spec.adaptive
        self.disable_by_batch_size = spec.disable_by_batch_size
        self.cost = draft_cost
        self.stats: dict[str, _Acceptance] = {}

    def choose(self, request_ids: list[str], batch_size: int) -> dict[str, int]:
        """k > 0 for the requests that draft next step (the others are left out)."""
        if self.disable_by_batch_size is not None and batch_size >= self.disable_by_batch_size:
            return {}
        if not self.adaptive:
            return dict.fromkeys(request_ids, self.k_max)
        out = {}
        for rid in request_ids:
            s = self.stats.setdefault(rid, _Acceptance())
            k = best_num_drafts(s.alpha, self.cost, self.k_max)
            if k == 0 and s.steps_without_drafts + 1 >= PROBE_INTERVAL:
                k = 1
            s.steps_without_drafts = 0 if k else s.steps_without_drafts + 1
            if k:
                out[rid] = k
        return out

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """One verification: num_accepted of num_drafts drafts were accepted (a prefix of them)."""
        if not self.adaptive or num_drafts == 0:
            return
        s = self.stats.setdefault(request_id, _Acceptance())
        s.successes = DECAY * s.successes + num_accepted
        s.trials = DECAY * s.trials + num_accepted + (num_accepted < num_drafts)

    def free(self, request_ids) -> None:
        for rid in request_ids:
            self.stats.pop(rid, None)
