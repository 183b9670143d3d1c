"""The rejection sampler keeps the target distribution exactly (Leviathan et al. 2023, Theorem 3.5;
Chen et al. 2023, Theorem 1): whatever the draft and its distribution q, the first emitted token
is distributed as the target's p. Checked against p itself with a chi-square test over many seeded
draws, for a proper q, a one-hot q (prompt lookup) and drafts the target gives probability 0."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from flashserve.spec_decode.rejection_sampler import greedy_verify, sample_verify

N = 6000
P0 = torch.tensor([0.05, 0.30, 0.0, 0.15, 0.40, 0.10])  # target after the last known token
P1 = torch.tensor([0.25, 0.05, 0.20, 0.30, 0.10, 0.10])  # target after the first draft
Q0 = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.10, 0.20])  # draft model: gives mass where p is 0


def first_token_counts(draw_draft, q0, seed=0):
    """Counts of the first emitted token over N verifications with drafts from `draw_draft`."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(P0))
    p = torch.stack([P0, P1, P1])
    for _ in range(N):
        d0 = draw_draft(gen)
        q = None if q0 is None else torch.stack([q0, P1])
        out = sample_verify(p, [d0, 2], q, gen)
        counts[out[0]] += 1
    return counts


def assert_distributed_as(counts, p):
    keep = p > 0
    assert counts[~keep].sum() == 0, "emitted a token the target gives probability 0"
    stat = chisquare(counts[keep].numpy(), (p[keep] / p[keep].sum() * counts.sum()).numpy())
    assert stat.pvalue > 1e-3, stat


def test_draft_model_distribution_is_corrected_to_the_target():
    counts = first_token_counts(lambda g: int(torch.multinomial(Q0, 1, generator=g)), Q0)
    assert_distributed_as(counts, P0)


@pytest.mark.parametrize("draft", [4, 0, 2])  # likely, unlikely, impossible under p
def test_one_hot_draft_keeps_the_target_distribution(draft):
    counts = first_token_counts(lambda g: draft, None)
    assert_distributed_as(counts, P0)
    if draft == 2:
        assert counts[2] == 0


def test_bonus_token_after_all_accepted_is_from_the_last_row():
    """One-hot drafts the target is sure of are always accepted; the bonus comes from the last row."""
    gen = torch.Generator().manual_seed(1)
    sure = torch.zeros(6)
    sure[3] = 1.0
    counts = torch.zeros(6)
    for _ in range(N):
        out = sample_verify(torch.stack([sure, sure, P1]), [3, 3], None, gen)
        assert out[:2] == [3, 3]
        counts[out[2]] += 1
    assert_distributed_as(counts, P1)


def test_seeded_generators_reproduce():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return [sample_verify(torch.stack([P0, P1, P1]), [4, 3], None, gen) for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_greedy_accepts_while_the_target_agrees():
    assert greedy_verify([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert greedy_verify([5, 6, 7, 8], [5, 9, 7]) == [5, 6]
    assert greedy_verify([5, 6], [1]) == [5]
    assert greedy_verify([5], []) == [5]
