"""Scheduler bookkeeping of draft tokens on synthetic runner outputs (no model, exact block ids):
drafts count in the token budget, are capped by max_tokens, the context and the budget, never
cause a preemption, and the blocks of rejected drafts go back to the pool."""
from __future__ import annotations

from flashserve.config import CacheConfig, SchedulerConfig
from flashserve.core.request import Request
from flashserve.core.sched_output import RunnerOutput
from flashserve.core.scheduler import Scheduler
from flashserve.sampling_params import SamplingParams


def make(budget=64, blocks=40, bs=4, max_len=256) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=max_len),
                     CacheConfig(block_size=bs), blocks)


def req(rid, n, **params) -> Request:
    first = 100 + 1000 * (ord(rid) - ord("a"))  # no two requests share a prefix
    return Request(rid, list(range(first, first + n)), SamplingParams(ignore_eos=True, **params))


def run_step(s, sampled):
    """sampled: request id → the tokens the runner returns for it (default [7] when it samples)."""
    out = s.schedule()
    toks = [sampled.get(r.request_id, [7]) if r.samples_this_step else [] for r in out.scheduled]
    s.update_from_output(out, RunnerOutput([r.request_id for r in out.scheduled], toks))
    s.check_invariants()
    return out


def test_drafts_are_scheduled_with_the_decode_and_rejected_ones_rolled_back():
    s = make()
    a = req("a", 6, max_tokens=50)
    s.add_request(a)
    run_step(s, {})  # prefill: 6 tokens computed, 1 output token → 7 tokens
    assert s.spec_candidates() == [a]
    assert a.block_ids == [1, 2]
    s.set_spec_tokens({"a": [1, 2, 3, 4, 5]})
    # positions 6..11: the last token and 5 drafts → blocks for 12 tokens
    out = run_step(s, {"a": [1, 2, 9]})  # d0, d1 accepted, d2 rejected, 9 from the target
    sr = out.scheduled[0]
    assert (sr.num_computed_tokens, sr.num_scheduled_tokens, sr.spec_token_ids) == (6, 6, [1, 2, 3, 4, 5])
    # computed: 7 tokens + 2 accepted drafts = 9 of the 10 tokens; blocks for 9 slots kept
    assert (a.num_tokens, a.num_computed_tokens, a.output_token_ids) == (10, 9, [7, 1, 2, 9])
    assert a.block_ids == [1, 2, 3]
    assert s.kv_cache_manager.num_free_blocks == 40 - 1 - 3
    assert (a.num_draft_tokens, a.num_accepted_tokens) == (5, 2)
    stats = s.get_stats()
    assert (stats.spec_draft_tokens_total, stats.spec_accepted_tokens_total) == (5, 2)
    assert a.spec_token_ids == []  # consumed by the step


def test_drafts_are_capped_by_max_tokens_context_and_budget():
    s = make(budget=64, max_len=14)
    a, b = req("a", 6, max_tokens=4), req("b", 6, max_tokens=50)
    s.add_request(a)
    s.add_request(b)
    run_step(s, {})  # both prefilled: 1 output token each
    s.set_spec_tokens({"a": [1] * 8, "b": [1] * 8})
    out = run_step(s, {"a": [1, 1, 1], "b": [1, 1, 1, 1, 1, 1]})
    drafts = {r.request_id: len(r.spec_token_ids) for r in out.scheduled}
    # a: 3 more tokens allowed → 2 drafts + the target's; b: context 14 - 7 tokens - 1 → 6 drafts
    assert drafts == {"a": 2, "b": 6}
    assert s.requests.get("a") is None  # finished at max_tokens
    assert b.num_tokens == 13 and b.num_computed_tokens == 12
    s2 = make(budget=5)
    c = req("c", 4, max_tokens=50)
    s2.add_request(c)
    run_step(s2, {})
    s2.set_spec_tokens({"c": [1] * 8})
    out = run_step(s2, {"c": [1]})
    assert [(r.num_scheduled_tokens, len(r.spec_token_ids)) for r in out.scheduled] == [(5, 4)]


def test_drafts_never_preempt_and_are_dropped_when_the_pool_is_short():
    s = make(blocks=5)  # 4 usable blocks of 4 slots
    a, b = req("a", 7, max_tokens=8), req("b", 7, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    run_step(s, {})  # both prefilled: 8 tokens, 2 blocks each, the pool is full
    s.set_spec_tokens({"a": [1, 2], "b": [1, 2]})
    out = run_step(s, {})
    assert [(r.request_id, r.num_scheduled_tokens, r.spec_token_ids) for r in out.scheduled] == [
        ("a", 1, []), ("b", 1, [])]
    assert s.num_preemptions_total == 0


def test_a_preempted_request_loses_its_drafts():
    s = make()
    a = req("a", 6, max_tokens=50)
    s.add_request(a)
    run_step(s, {})
    s.set_spec_tokens({"a": [1, 2]})
    s._preempt(a)
    assert a.spec_token_ids == [] and s.spec_candidates() == []
