"""Scheduler bookkeeping on synthetic runner outputs (no model): budgets, chunking, preemption,
static batching, priorities, stop conditions, and a randomized leak check."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from flashserve.config import CacheConfig, SchedulerConfig
from flashserve.core.request import Request, RequestStatus
from flashserve.core.sched_output import RunnerOutput
from flashserve.core.scheduler import Scheduler
from flashserve.sampling_params import SamplingParams

EOS = 0


def make(budget=64, seqs=8, blocks=80, bs=4, max_len=256, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=max_len, **kw),
                     CacheConfig(block_size=bs), blocks)


def request(rid, n_prompt, rng=None, priority=0, **params) -> Request:
    rng = rng or random.Random(hash(rid) & 0xFFFF)
    return Request(rid, [rng.randrange(1, 500) for _ in range(n_prompt)], SamplingParams(**params),
                   eos_token_ids=(EOS,), priority=priority)


def step(s: Scheduler, token=lambda r: 7):
    out = s.schedule()
    toks = [[token(r)] if r.samples_this_step else [] for r in out.scheduled]
    changed = s.update_from_output(out, RunnerOutput([r.request_id for r in out.scheduled], toks))
    s.kv_cache_manager.check_invariants(list(s.requests.values()))
    return out, changed


def run_all(s: Scheduler, token=lambda r: 7, limit=10_000):
    outs = []
    for _ in range(limit):
        if not s.has_unfinished_requests():
            return outs
        outs.append(step(s, token)[0])
    raise AssertionError("did not finish")


def test_decodes_go_first_and_prompts_are_chunked_under_the_budget():
    s = make(budget=16)
    s.add_request(request("a", 5, max_tokens=20))
    step(s)  # a's prefill
    s.add_request(request("b", 40, max_tokens=2))
    out, _ = step(s)
    assert [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled] == [("a", 1), ("b", 15)]
    out, _ = step(s)
    assert [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled] == [("a", 1), ("b", 15)]
    out, _ = step(s)
    assert [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled] == [("a", 1), ("b", 10)]
    assert out.total_num_scheduled_tokens <= 16
    assert s.requests["b"].num_output_tokens == 1  # the last chunk sampled b's first token


def test_preemption_frees_blocks_and_every_request_still_completes():
    s = make(budget=64, blocks=13, bs=4)  # 12 usable blocks = 48 slots
    reqs = [request(str(i), 10, max_tokens=12, ignore_eos=True) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    run_all(s)
    assert s.num_preemptions_total > 0
    assert all(r.num_output_tokens == 12 and r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert s.kv_cache_manager.num_free_blocks == 12


def test_static_mode_admits_no_one_while_a_batch_runs():
    s = make(scheduling="static", seqs=2)
    for i in range(3):
        s.add_request(request(str(i), 6, max_tokens=3 + i, ignore_eos=True))
    seen = [{r.request_id for r in out.scheduled} for out in run_all(s)]
    first_two = [x for x in seen if x & {"0", "1"}]
    assert all("2" not in x for x in first_two)
    assert seen[-1] == {"2"}


def test_priority_policy_orders_admission():
    s = make(policy="priority", seqs=1)
    s.add_request(request("low", 4, max_tokens=1, priority=5))
    s.add_request(request("high", 4, max_tokens=1, priority=-1))
    out, _ = step(s)
    assert [r.request_id for r in out.scheduled] == ["high"]


def test_stop_conditions():
    s = make()
    a = request("a", 4, max_tokens=10, min_tokens=2)
    b = request("b", 4, max_tokens=10, stop_token_ids=[9])
    c = request("c", 4, max_tokens=3, ignore_eos=True)
    d = request("d", 4, max_tokens=None)
    for r in (a, b, c, d):
        s.add_request(r)
    tokens = {"a": iter([EOS, EOS, 5]), "b": iter([5, 9]), "c": iter([EOS, EOS, EOS]), "d": iter([5] * 300)}
    run_all(s, token=lambda r: next(tokens[r.request_id]))
    assert a.output_token_ids == [EOS, EOS] and a.status is RequestStatus.FINISHED_STOPPED
    assert b.stop_reason == 9 and b.status is RequestStatus.FINISHED_STOPPED
    assert c.output_token_ids == [EOS] * 3 and c.status is RequestStatus.FINISHED_LENGTH
    assert d.num_tokens == 256 and d.status is RequestStatus.FINISHED_LENGTH


def test_requests_that_can_never_fit_are_refused():
    import pytest

    s = make(blocks=5, bs=4)
    with pytest.raises(ValueError, match="KV"):
        s.add_request(request("big", 10, max_tokens=20))
    with pytest.raises(ValueError, match="context"):
        s.add_request(request("long", 300))


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_adds_aborts_and_steps_leak_nothing(data):
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    s = make(budget=data.draw(st.sampled_from([8, 32, 128])), blocks=data.draw(st.integers(12, 40)), bs=4,
             seqs=data.draw(st.integers(1, 6)), max_len=64)
    shared = [rng.randrange(1, 500) for _ in range(12)]
    live, n = [], 0
    for _ in range(data.draw(st.integers(5, 60))):
        action = data.draw(st.sampled_from(["add", "add", "step", "step", "step", "abort"]))
        if action == "add":
            prompt = (shared[: rng.randint(0, 12)] + [rng.randrange(1, 500) for _ in range(rng.randint(1, 20))])
            r = Request(str(n), prompt, SamplingParams(max_tokens=rng.randint(1, 10)), eos_token_ids=(EOS,))
            n += 1
            try:
                s.add_request(r)
                live.append(r)
            except ValueError:
                pass
        elif action == "abort" and live:
            s.abort_requests([rng.choice(live).request_id])
        else:
            step(s, token=lambda r: rng.choice([EOS, 3, 4, 5, 6]))
    s.abort_requests([r.request_id for r in live])
    s.abort_requests([r.request_id for r in live])  # idempotent
    kvm = s.kv_cache_manager
    kvm.check_invariants([])
    assert not s.has_unfinished_requests()
    assert kvm.num_free_blocks == kvm.num_blocks - 1
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks)
