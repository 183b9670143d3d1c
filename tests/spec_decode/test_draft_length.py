"""Adaptive k (spec_decode/draft_length.py). The chosen k is checked against a Monte-Carlo simulation
of speculative steps (not the closed form the code uses); the per-request controller stops a
request's drafting when its drafts fail and resumes it when they succeed; in the whole engine, a
draft model that never agrees with the target is soon asked for (almost) nothing while one that
mostly agrees keeps drafting, outputs equal plain decoding, and a seeded sampling request's tokens
depend on its own sequence only, not on what it is batched with."""
from __future__ import annotations

import numpy as np
import pytest

from flashserve import LLM, SamplingParams
from flashserve.config import SpeculativeConfig
from flashserve.spec_decode.draft_length import PROBE_INTERVAL, DraftLength, best_num_drafts
from tests.model.tiny import hf_tiny, save_hf
from tests.spec_decode.test_engine_draft_model import noisy_draft  # noqa: F401 (fixture)
from tests.spec_decode.test_engine_ngram import (  # noqa: F401 (plain: plain_out's fixture)
    GREEDY, assert_no_leak, generate, plain, plain_out, prompts)


def simulated_speedup(alpha: float, cost: float, k: int, rng, steps: int = 200_000) -> tuple[float, float]:
    """Tokens per unit cost of steps with k drafts, each accepted with probability alpha until the
    first rejection, plus the target's own token (mean, standard error)."""
    if k == 0:
        return 1.0, 0.0
    accepted = (rng.random((steps, k)) < alpha).cumprod(axis=1).sum(axis=1)
    tokens = (accepted + 1) / (1 + cost * k)
    return tokens.mean(), tokens.std() / np.sqrt(steps)


@pytest.mark.parametrize("alpha", [0.05, 0.3, 0.6, 0.9])
@pytest.mark.parametrize("cost", [0.05, 0.25, 0.6])
def test_the_chosen_k_is_the_fastest_in_simulation(alpha, cost):
    rng = np.random.default_rng(0)
    sims = [simulated_speedup(alpha, cost, k, rng) for k in range(6)]
    best, best_err = max(sims)
    chosen, err = sims[best_num_drafts(alpha, cost, 5)]
    assert chosen >= best - 4 * (err + best_err) - 1e-9, (alpha, cost, best_num_drafts(alpha, cost, 5), sims)


def spec(**kw) -> SpeculativeConfig:
    return SpeculativeConfig(method="ngram", num_speculative_tokens=4, **kw)


def test_failing_drafts_stop_then_probe_then_recover():
    dl = DraftLength(spec(), draft_cost=0.15)
    history = []
    for _ in range(40):  # every draft rejected
        k = dl.choose(["r"], batch_size=1).get("r", 0)
        history.append(k)
        if k:
            dl.observe("r", k, 0)
    assert history[0] >= 2  # a new request starts optimistic
    first_zero = history.index(0)
    assert first_zero <= 4
    probes = [i for i, k in enumerate(history) if i > first_zero and k]
    assert all(history[i] == 1 for i in probes)
    assert np.diff(probes).tolist() == [PROBE_INTERVAL] * (len(probes) - 1) and len(probes) >= 3
    for _ in range(40):  # every draft accepted again: back to all k
        k = dl.choose(["r"], batch_size=1).get("r", 0)
        if k:
            dl.observe("r", k, k)
    assert dl.choose(["r"], batch_size=1) == {"r": 4}
    dl.free(["r"])
    assert dl.stats == {}


def test_requests_are_judged_apart_and_the_knobs_hold():
    dl = DraftLength(spec(), draft_cost=0.15)
    for _ in range(10):
        ks = dl.choose(["good", "bad"], batch_size=2)
        for rid, k in ks.items():
            dl.observe(rid, k, k if rid == "good" else 0)
    assert dl.choose(["good", "bad"], batch_size=2) == {"good": 4}
    assert DraftLength(spec(adaptive=False), 0.15).choose(["a", "b"], 2) == {"a": 4, "b": 4}
    off = DraftLength(spec(disable_by_batch_size=3), 0.15)
    assert off.choose(["a", "b"], 2) != {} and off.choose(["a", "b"], 3) == {}
    assert DraftLength(spec(), draft_cost=2.0).choose(["a"], 1) == {}  # a draft dearer than a step never pays


@pytest.fixture(scope="module")
def unrelated_draft(tmp_path_factory, hf_smollm2_tokenizer):
    """Another random tiny Llama with the same vocabulary: its drafts almost never match the target."""
    d = tmp_path_factory.mktemp("unrelated_draft")
    save_hf(hf_tiny("llama", seed=7), d)
    hf_smollm2_tokenizer.save_pretrained(d)
    return str(d)


def speculating(target, draft, adaptive: bool, **kw):
    return LLM(model=target, dtype="float32", kv_cache_dtype="float32", block_size=4, **kw,
               speculative_config={"model": draft, "num_speculative_tokens": 4, "adaptive": adaptive,
                                   "draft_cost": 0.1})  # as cheap as a small draft: only acceptance decides


def drafted(llm, ps, params) -> tuple[list, int, int]:
    outs = generate(llm, ps, params)
    stats = llm.engine.get_stats()
    return [o.outputs[0].token_ids for o in outs], stats.spec_draft_tokens_total, stats.spec_accepted_tokens_total


def test_a_draft_that_never_agrees_is_soon_not_asked(tiny_llama, unrelated_draft, plain_out):
    """In a pool small enough to preempt: outputs equal plain decoding; the adaptive engine drafts
    under a quarter of what the pinned one does."""
    kw = dict(kv_cache_memory=40 * 2 * 2 * 4 * 2 * 16 * 4)  # 40 float32 blocks
    pinned, pinned_drafts, pinned_accepted = drafted(speculating(tiny_llama[0], unrelated_draft, False, **kw),
                                                     prompts(), GREEDY)
    llm = speculating(tiny_llama[0], unrelated_draft, True, **kw)
    adaptive, adaptive_drafts, _ = drafted(llm, prompts(), GREEDY)
    assert pinned == plain_out and adaptive == plain_out
    assert pinned_accepted < 0.1 * pinned_drafts  # the premise: this draft is useless
    assert adaptive_drafts < 0.25 * pinned_drafts
    assert_no_leak(llm)


def test_a_draft_that_mostly_agrees_keeps_drafting(tiny_llama, noisy_draft, plain_out):  # noqa: F811
    pinned, pinned_drafts, _ = drafted(speculating(tiny_llama[0], noisy_draft[0], False), prompts(), GREEDY)
    adaptive, adaptive_drafts, accepted = drafted(speculating(tiny_llama[0], noisy_draft[0], True), prompts(), GREEDY)
    assert pinned == plain_out and adaptive == plain_out
    assert accepted > 0.5 * adaptive_drafts
    assert adaptive_drafts > 0.5 * pinned_drafts


def test_a_seeded_request_does_not_depend_on_its_batch(tiny_llama, noisy_draft):  # noqa: F811
    """Its drafts, their number and its random draws follow its own sequence: alone or among others
    (whose acceptance differs), the same tokens."""
    llm = speculating(tiny_llama[0], noisy_draft[0], True)
    params = SamplingParams(temperature=0.9, seed=11, max_tokens=40, ignore_eos=True)
    ps = prompts()
    alone = generate(llm, ps[-1:], params)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.3, max_tokens=40, ignore_eos=True)
    mixed = llm.generate([{"prompt_token_ids": p} for p in ps], [others] * (len(ps) - 1) + [params],
                         use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    assert llm.engine.get_stats().spec_accepted_tokens_total > 0
