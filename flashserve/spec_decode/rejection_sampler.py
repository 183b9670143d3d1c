"""Lossless verification of draft tokens: speculative sampling (Leviathan, Kalman and Matias 2023,
"Fast Inference from Transformers via Speculative Decoding", Algorithm 1 and Appendix A.1; Chen et
al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2).

A request with k drafts d_0..d_{k-1} comes with k + 1 rows of target logits: row j is the target's
distribution p_j for the token after d_{j-1} (row 0: after the last known token). q_j is the
proposer's distribution for d_j; a proposer without one (prompt lookup) is deterministic, so q_j is
one-hot on d_j. For j = 0, 1, ...:

    accept d_j with probability min(1, p_j(d_j) / q_j(d_j))          (one-hot q: p_j(d_j))
    on the first rejection emit t ~ normalize(max(0, p_j - q_j)) and stop
    if all k are accepted, emit a bonus t ~ p_k

Each emitted token is distributed exactly as p (the theorem of both papers), so speculation changes
the speed, never the distribution. Greedy rows (temperature 0) accept while the target's argmax
equals the draft, then emit the target's argmax: token for token what plain greedy decoding gives.

p is what the plain sampler draws from: logits after bias, min_tokens, penalties, grammar,
temperature, top-k, top-p and min-p (sample/sampler.py). A seeded request draws its k uniforms and
then one row of exponential noise (the sampler's exponential race) from its own generator, a fixed
amount per step whatever is accepted, so its tokens depend only on its seed and its own sequence.

Typical acceptance (speculative_config acceptance="typical"; Cai et al. 2024, "Medusa: Simple LLM
Inference Acceleration Framework with Multiple Decoding Heads", section 2.3.1) is the other rule for
sampling rows. It is NOT lossless: it trades the exact distribution for more accepted drafts. With
H(p_j) = -sum_v p_j(v) log p_j(v), the entropy of the row's processed distribution:

    accept d_j  iff  p_j(d_j) > min(epsilon, delta * exp(-H(p_j)))     (no random draw)
    on the first failure emit t ~ p_j and stop; if all k pass, emit a bonus t ~ p_k

A peaked p (low entropy) demands up to epsilon of a draft, a flat p (high entropy) much less, since
there many continuations are plausible. The paper always accepts its first token, the base model's
own greedy one; here that role falls to the target's own token after the accepted drafts, drawn
from p as plain sampling draws it, so each step still emits at least one token and every draft is
tested. A seeded request draws one row of exponential noise per step from its own generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flashserve.config import TypicalAcceptance
from flashserve.sample.sampler import SamplingMetadata, apply_grammar, process_logits, sampling_probs


@dataclass
class VerifyOutput:
    token_ids: list[list[int]]  # per request: the accepted drafts, then the target's own token
    num_accepted: list[int]  # per request: accepted drafts
    logprobs: torch.Tensor | None  # (rows, vocab) log_softmax of the processed logits, when asked


def rejection_sample(logits: torch.Tensor, md: SamplingMetadata, drafts: list[list[int]],
                     draft_probs: list[torch.Tensor | None], generators: list[torch.Generator | None],
                     typical: TypicalAcceptance | None = None) -> VerifyOutput:
    """logits: (rows, vocab) float32, request r's len(drafts[r]) + 1 rows contiguous, in order;
    md: one row per logits row; draft_probs[r]: (k_r, vocab) proposer probabilities or None (one-hot);
    generators: one per request; typical: verify sampling rows by typical acceptance (draft_probs
    unused) instead of rejection sampling."""
    logits = process_logits(logits, md)
    want_logprobs = any(k is not None for k in md.num_logprobs)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if md.grammar is not None:
        logits = apply_grammar(logits, *md.grammar)
    argmax = logits.argmax(dim=-1).tolist()  # (rows,)
    probs = None if md.all_greedy else sampling_probs(logits, md)  # (rows, vocab)
    greedy = md.greedy.tolist()
    tokens, accepted, lo = [], [], 0
    for d, q, gen in zip(drafts, draft_probs, generators):
        k = len(d)
        if greedy[lo]:
            out = greedy_verify(argmax[lo : lo + k + 1], d)
        elif typical is not None:
            out = typical_verify(probs[lo : lo + k + 1], d, typical, gen)
        else:
            out = sample_verify(probs[lo : lo + k + 1], d, q, gen)
        tokens.append(out)
        accepted.append(len(out) - 1)
        lo += k + 1
    return VerifyOutput(tokens, accepted, logprobs)


def greedy_verify(target_argmax: list[int], draft: list[int]) -> list[int]:
    """target_argmax: k + 1 ids. Accept while the target agrees, then the target's own token."""
    a = 0
    while a < len(draft) and draft[a] == target_argmax[a]:
        a += 1
    return draft[:a] + [target_argmax[a]]


def sample_verify(p: torch.Tensor, draft: list[int], q: torch.Tensor | None,
                  gen: torch.Generator | None) -> list[int]:
    """p: (k + 1, vocab) target probabilities; q: (k, vocab) draft probabilities or None (one-hot)."""
    k = len(draft)
    a = k
    if k:
        idx = torch.arange(k, device=p.device)
        d = torch.tensor(draft, dtype=torch.int64, device=p.device)
        p_d = p[idx, d]  # (k,)
        q_d = torch.ones_like(p_d) if q is None else q[idx, d]
        u = torch.rand(k, generator=gen, device=p.device)
        # u < p/q, written without the division (q_d > 0 for a token the proposer drew).
        rejected = (u * q_d >= p_d).tolist()
        a = rejected.index(True) if True in rejected else k
    if a < k:
        residual = p[a].clone()
        if q is None:
            residual[draft[a]] = 0.0  # max(0, p - onehot(d)): only d's own mass goes
        else:
            residual = (residual - q[a]).clamp_min_(0.0)
        dist = residual if residual.sum() > 0 else p[a]  # p == q to rounding: nothing to correct
    else:
        dist = p[k]  # every draft accepted: the bonus token from the last row
    return draft[:a] + [draw(dist, gen)]


def typical_verify(p: torch.Tensor, draft: list[int], rule: TypicalAcceptance,
                   gen: torch.Generator | None) -> list[int]:
    """p: (k + 1, vocab) target probabilities. Accept while p_j(d_j) clears the row's typical
    threshold, then draw the target's own token from p at the first failing row (or the last)."""
    k = len(draft)
    a = k
    if k:
        d = torch.tensor(draft, dtype=torch.int64, device=p.device)
        p_d = p[torch.arange(k, device=p.device), d]  # (k,)
        passed = (p_d > typical_thresholds(p[:k], rule)).tolist()
        a = passed.index(False) if False in passed else k
    return draft[:a] + [draw(p[a], gen)]


def typical_thresholds(p: torch.Tensor, rule: TypicalAcceptance) -> torch.Tensor:
    """p: (n, vocab) probabilities → (n,) min(epsilon, delta * exp(-H(p))) (Cai et al. 2024, eq. in
    section 2.3.1); 0 log 0 counts as 0, so tokens outside top-k/top-p add no entropy."""
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # (n,) nats
    return (rule.posterior_alpha * torch.exp(-entropy)).clamp_max(rule.posterior_threshold)


def draw(dist: torch.Tensor, gen: torch.Generator | None) -> int:
    """One token from dist (vocab,), unnormalized is fine, with one row of the generator's noise."""
    noise = torch.empty_like(dist).exponential_(generator=gen)  # (vocab,)
    # Exponential race: argmax dist_i / E_i picks i with probability dist_i / sum(dist).
    return int((dist / noise).argmax())
