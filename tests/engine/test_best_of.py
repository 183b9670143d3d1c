"""best_of > n: best_of samples are generated and the n with the highest cumulative logprob
come back, best first (vLLM's semantics). Samples are seeded per index (seed + i), so a run
with n = best_of and the same seed generates the very same candidates to rank by hand."""
from __future__ import annotations

import math

import pytest

from flashserve import LLM, SamplingParams
from flashserve.sampling_params import SamplingParams as SP

PROMPT = list(range(40, 70))


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=tiny_llama[0], dtype="float32", block_size=4)


def params(**kw) -> SamplingParams:
    return SamplingParams(**(dict(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True) | kw))


def test_best_of_returns_the_top_n_by_cumulative_logprob(llm):
    # stop tokens make the candidates differ in length as well
    stops = dict(stop_token_ids=[3, 5, 7, 11, 13], max_tokens=12)
    every = llm.generate([PROMPT], params(n=6, logprobs=0, **stops), use_tqdm=False)[0].outputs
    for c in every:
        assert math.isclose(c.cumulative_logprob, sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                            abs_tol=1e-9)
    assert len({c.token_ids for c in every}) == 6 and len({len(c.token_ids) for c in every}) > 1
    ranked = sorted(every, key=lambda c: -c.cumulative_logprob)

    best = llm.generate([PROMPT], params(n=2, best_of=6, **stops), use_tqdm=False)[0].outputs
    assert [c.index for c in best] == [0, 1]
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    # (the second run reads the prompt's full blocks from the prefix cache: equal up to rounding)
    assert [c.cumulative_logprob for c in best] == pytest.approx([c.cumulative_logprob for c in ranked[:2]],
                                                                 abs=1e-4)
    assert all(c.logprobs is None for c in best)  # logprobs were not asked for

    with_lp = llm.generate([PROMPT], params(n=3, best_of=6, logprobs=2, **stops), use_tqdm=False)[0].outputs
    assert [c.token_ids for c in with_lp] == [c.token_ids for c in ranked[:3]]
    for c in with_lp:
        assert all(len(e) in (2, 3) for e in c.logprobs)
        assert math.isclose(c.cumulative_logprob, sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)),
                            abs_tol=1e-9)


def test_best_of_reports_only_when_all_candidates_are_done(llm):
    eng = llm.engine
    eng.add_request("b", {"prompt_token_ids": PROMPT}, params(n=1, best_of=3))
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs) == 1
    kvm = eng.scheduler.kv_cache_manager
    kvm.check_invariants([])


def test_best_of_equal_to_n_is_plain_n(llm):
    a = llm.generate([PROMPT], params(n=3, best_of=3), use_tqdm=False)[0].outputs
    b = llm.generate([PROMPT], params(n=3), use_tqdm=False)[0].outputs
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


@pytest.mark.parametrize("kw", [dict(n=3, best_of=2), dict(temperature=0, best_of=2),
                                dict(temperature=0, n=2, best_of=3)])
def test_invalid_best_of(kw):
    with pytest.raises(ValueError):
        SP(**kw)


def test_greedy_with_best_of_one_or_n_samples_is_allowed():
    SP(temperature=0, best_of=1)
    SP(temperature=0, n=2)
