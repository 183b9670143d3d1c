"""Medusa's typical acceptance (Cai et al. 2024, section 2.3.1) as rejection_sampler.typical_verify
applies it: a draft d_j is accepted iff p_j(d_j) > min(epsilon, delta * exp(-H(p_j))), computed here
independently in plain Python on hand-made distributions. A peaked and a flat distribution show the
entropy-adaptive threshold at work: the same probability is rejected where the target is sure of
something else and accepted where it is not sure of anything. The token after the accepted drafts is
drawn from p at that row (chi-square), with one row of the request's own noise per step."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from flashserve.config import SpeculativeConfig, TypicalAcceptance
from flashserve.spec_decode.rejection_sampler import typical_thresholds, typical_verify

RULE = TypicalAcceptance()  # epsilon 0.09, delta 0.3: the Medusa authors' settings
VOCAB = 20
PEAKED = [0.90, 0.05, 0.03, 0.02] + [0.0] * (VOCAB - 4)
FLAT = [1.0 / VOCAB] * VOCAB
SKEWED = [0.5, 0.2, 0.1, 0.1, 0.06, 0.04] + [0.0] * (VOCAB - 6)


def reference_threshold(p: list[float], eps: float, delta: float) -> float:
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    return min(eps, delta * math.exp(-entropy))


def reference_accepted(rows: list[list[float]], draft: list[int], eps=0.09, delta=0.3) -> int:
    a = 0
    while a < len(draft) and rows[a][draft[a]] > reference_threshold(rows[a], eps, delta):
        a += 1
    return a


def test_the_threshold_adapts_to_the_entropy():
    """PEAKED (H = 0.43 nats): the hard threshold epsilon binds; FLAT (H = log 20): delta / 20 does."""
    got = typical_thresholds(torch.tensor([PEAKED, FLAT, SKEWED]), RULE).tolist()
    want = [reference_threshold(p, 0.09, 0.3) for p in (PEAKED, FLAT, SKEWED)]
    assert got == pytest.approx(want, rel=1e-5)
    assert want[0] == 0.09 and want[1] == pytest.approx(0.3 / VOCAB)
    # A 5 % token: rejected under the peaked distribution, accepted under the flat one.
    assert typical_verify(torch.tensor([PEAKED, FLAT]), [1], RULE, None)[:1] != [1]
    assert typical_verify(torch.tensor([FLAT, FLAT]), [1], RULE, None)[:1] == [1]


@pytest.mark.parametrize("rows,draft", [
    ([PEAKED, FLAT, SKEWED, PEAKED], [0, 7, 1]),  # all three pass: a bonus token
    ([PEAKED, FLAT, SKEWED, PEAKED], [0, 7, 4]),  # 0.06 < min(0.09, 0.3 e^-H(SKEWED)) = 0.072
    ([SKEWED, PEAKED, FLAT], [3, 1]),  # 0.10 passes, 0.05 fails under PEAKED
    ([SKEWED, FLAT], [9]),  # probability 0: never accepted
    ([FLAT, FLAT, FLAT], [2, 3]),
])
@pytest.mark.parametrize("eps,delta", [(0.09, 0.3), (0.3, 0.09), (0.02, 1.0)])
def test_accepted_prefix_matches_the_rule(rows, draft, eps, delta):
    rule = TypicalAcceptance(eps, delta)
    a = reference_accepted(rows, draft, eps, delta)
    out = typical_verify(torch.tensor(rows), draft, rule, torch.Generator().manual_seed(0))
    assert out[:a] == draft[:a] and len(out) == a + 1
    assert rows[a][out[a]] > 0  # the target's own token is from p's support at that row


def test_the_emitted_token_is_drawn_from_p_of_its_row():
    """After a failed draft the token comes from that row's p (not a residual: d itself may come)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.tensor([PEAKED, SKEWED])
    counts = [0] * VOCAB
    for _ in range(4000):
        out = typical_verify(p, [2], RULE, gen)  # 0.03 fails under PEAKED
        assert len(out) == 1
        counts[out[0]] += 1
    support = [i for i, x in enumerate(PEAKED) if x > 0]
    assert sum(counts[i] for i in support) == 4000
    assert chisquare([counts[i] for i in support], [PEAKED[i] * 4000 for i in support]).pvalue > 1e-3


def test_one_row_of_noise_per_step_from_the_requests_generator():
    """Whatever is accepted, a step takes exactly one exponential row from the request's generator."""
    for draft in ([0, 7, 1], [2], []):
        gen = torch.Generator().manual_seed(11)
        typical_verify(torch.tensor([PEAKED, FLAT, SKEWED, PEAKED]), draft, RULE, gen)
        twin = torch.Generator().manual_seed(11)
        torch.empty(VOCAB).exponential_(generator=twin)
        assert torch.equal(gen.get_state(), twin.get_state())


def test_typical_acceptance_drafts_argmax_tokens():
    assert SpeculativeConfig(method="ngram", acceptance="typical").samples_drafts is False
    assert SpeculativeConfig(method="ngram").samples_drafts is True
    assert SpeculativeConfig(method="ngram").typical_acceptance is None
    assert SpeculativeConfig(method="ngram", acceptance="typical", posterior_alpha=0.5).typical_acceptance == \
        TypicalAcceptance(0.09, 0.5)


@pytest.mark.parametrize("knobs,message", [
    (dict(acceptance="lenient"), "unknown speculative acceptance 'lenient'; choose from rejection, typical"),
    (dict(acceptance="typical", posterior_threshold=1.5), r"posterior_threshold .* must be in \[0, 1\], got 1.5"),
    (dict(acceptance="typical", posterior_threshold=-0.1), r"must be in \[0, 1\], got -0.1"),
    (dict(acceptance="typical", posterior_alpha=-1.0), "posterior_alpha .* must be a finite number >= 0, got -1.0"),
    (dict(acceptance="typical", posterior_alpha=float("nan")), "posterior_alpha"),
    (dict(posterior_alpha=0.3), "posterior_alpha set the typical acceptance rule: add acceptance='typical'"),
    (dict(method=None, acceptance="typical"), "acceptance 'typical' verifies drafts: it needs a speculative method"),
])
def test_bad_acceptance_settings_are_named(knobs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**{"method": "ngram", **knobs}).validate()
