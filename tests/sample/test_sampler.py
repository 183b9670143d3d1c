"""Sampler against analytic distributions (chi-square), plain per-row references for the masks
and penalties, seeds that do not depend on the batch, and logprobs."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from flashserve.sample.sampler import Sampler, SamplingMetadata, process_logits, sampling_probs
from flashserve.sampling_params import SamplingParams

V = 12
LOGITS = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.1, -0.3, -0.8, -1.5, -2.0, -3.0])


def meta(params, outputs=None, prompts=None, gens=None, eos=(11,)):
    n = len(params)
    return SamplingMetadata.build(params=params, output_token_ids=outputs or [[] for _ in range(n)],
                                  prompt_token_ids=prompts or [[] for _ in range(n)],
                                  generators=gens or [None] * n, eos_token_ids=eos, device="cpu")


def expected_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Written from the definitions, one row, float64."""
    x = logits.astype(np.float64) / p.temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    keep[order[: p.top_k if p.top_k > 0 else len(x)]] = True
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    if p.top_p < 1.0:
        mass, kept = 0.0, np.zeros(len(x), bool)
        for i in order:
            if not keep[i] or mass >= p.top_p:
                break
            kept[i] = True
            mass += probs[i]
        probs = np.where(kept, probs, 0.0)
        probs /= probs.sum()
    if p.min_p > 0:
        probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    return probs


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.3, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(temperature=1.5, top_k=6, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_empirical_frequencies_match_the_analytic_distribution(params):
    draws = 4000
    gen = torch.Generator().manual_seed(1234)
    md = meta([params] * draws, gens=[gen] * draws)
    tokens = Sampler()(LOGITS.repeat(draws, 1), md).sampled_token_ids.numpy()
    want = expected_distribution(LOGITS.numpy(), params)
    counts = np.bincount(tokens, minlength=V)
    assert counts[want == 0].sum() == 0, "a masked token was drawn"
    support = want > 0
    assert chisquare(counts[support], want[support] * draws).pvalue > 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_masks_equal_the_reference_exactly_on_random_rows(seed):
    rng = random.Random(seed)
    params = [SamplingParams(temperature=rng.uniform(0.3, 2), top_k=rng.choice([-1, 1, 3, 7]),
                             top_p=rng.choice([1.0, 0.5, 0.9]), min_p=rng.choice([0.0, 0.1, 0.5])) for _ in range(8)]
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(seed)) * 2
    probs = sampling_probs(logits, meta(params)).numpy()
    for row, p in enumerate(params):
        want = expected_distribution(logits[row].numpy(), p)
        assert ((probs[row] > 0) == (want > 0)).all()
        np.testing.assert_allclose(probs[row], want, atol=1e-6)


def reference_penalties(logits, prompt, output, p: SamplingParams):
    out = logits.clone()
    for t, b in (p.logit_bias or {}).items():
        out[t] += b
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        out[t] -= p.presence_penalty + p.frequency_penalty * output.count(t)
    return out


def test_penalties_and_logit_bias_equal_the_reference_on_random_histories():
    rng = random.Random(0)
    params, prompts, outputs = [], [], []
    for _ in range(10):
        params.append(SamplingParams(repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
                                     presence_penalty=rng.uniform(-1, 1), frequency_penalty=rng.uniform(-1, 1),
                                     logit_bias={rng.randrange(V): rng.uniform(-5, 5)}))
        prompts.append([rng.randrange(V) for _ in range(rng.randint(0, 6))])
        outputs.append([rng.randrange(V) for _ in range(rng.randint(0, 8))])
    logits = torch.randn(10, V, generator=torch.Generator().manual_seed(3))
    got = process_logits(logits, meta(params, outputs, prompts))
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], reference_penalties(logits[i], prompts[i], outputs[i], p))


def test_min_tokens_bans_eos_and_stop_tokens():
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    logits = torch.zeros(2, V)
    logits[:, 11] = 10.0  # EOS would win
    logits[:, 4] = 9.0
    md = meta([p, p], outputs=[[1], [1, 2, 3]])
    assert Sampler()(logits, md).sampled_token_ids.tolist() == [0, 11]


def test_greedy_is_argmax_and_mixes_with_sampled_rows():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 3
    out = Sampler()(logits, meta(params)).sampled_token_ids
    assert out[0::2].tolist() == logits[0::2].argmax(-1).tolist()


def test_seeded_row_is_the_same_alone_and_inside_a_batch():
    def draw(row_params, others):
        gens = [torch.Generator().manual_seed(42)] + [None] * len(others)
        rows = [row_params] + others
        logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(9))
        logits[0] = LOGITS
        s = Sampler()
        return [s(logits, meta(rows, gens=gens)).sampled_token_ids[0].item() for _ in range(30)]

    p = SamplingParams(temperature=1.0, seed=42, top_p=0.95)
    rng = random.Random(1)
    others = [SamplingParams(temperature=rng.uniform(0.1, 2), top_k=rng.choice([-1, 5])) for _ in range(16)]
    assert draw(p, []) == draw(p, others)


def test_logprobs_are_log_softmax_of_the_processed_logits():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0, logprobs=3), SamplingParams(temperature=0.7), SamplingParams(logprobs=0)]
    out = Sampler()(logits, meta(params))
    fmt = out.format_logprobs()
    ref = torch.log_softmax(logits.double(), -1)
    top = ref[0].topk(3)
    assert list(fmt[0].top) == top.indices.tolist()  # most likely first
    for t, lp in fmt[0].top.items():
        assert math.isclose(lp, ref[0, t].item(), abs_tol=1e-5)
    assert fmt[0].token_id == top.indices[0].item() and fmt[0].rank == 1
    assert fmt[1] is None
    sampled = out.sampled_token_ids[2].item()
    assert fmt[2].token_id == sampled and fmt[2].top == {}
    assert math.isclose(fmt[2].logprob, ref[2, sampled].item(), abs_tol=1e-5)


def test_a_sampled_token_outside_the_top_n_gets_its_rank_in_the_vocabulary():
    rows = 64
    logits = torch.randn(rows, V, generator=torch.Generator().manual_seed(4)) * 0.3  # flat: ranks spread
    params = [SamplingParams(temperature=5.0, logprobs=i % 3) for i in range(rows)]
    out = Sampler()(logits, meta(params))
    fmt = out.format_logprobs()
    ranks = []
    for row, entry in enumerate(fmt):  # reference: 1 + the number of logits strictly above the sampled one's
        tok = out.sampled_token_ids[row].item()
        ranks.append(1 + sum(x > logits[row, tok].item() for x in logits[row].tolist()))
        assert entry.token_id == tok and len(entry.top) == row % 3
    assert [e.rank for e in fmt] == ranks
    assert sum(r > p.logprobs + 1 for r, p in zip(ranks, params)) > rows // 2  # mostly outside the top-N

    from flashserve.engine.output_processor import OutputProcessor

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return str(ids[0])

    row = next(i for i, (r, p) in enumerate(zip(ranks, params)) if p.logprobs == 2 and r > 3)
    shown = OutputProcessor(Tok())._format_logprobs(fmt[row])
    assert [lp.rank for lp in shown.values()] == [1, 2, ranks[row]]  # most likely first, true rank kept


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                    dict(n=0), dict(n=3, best_of=2), dict(min_tokens=5, max_tokens=2),
                                    dict(max_tokens=0), dict(min_p=1.5), dict(repetition_penalty=0),
                                    dict(presence_penalty=3), dict(logprobs=-1), dict(stop=[""])])
def test_invalid_sampling_params_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
