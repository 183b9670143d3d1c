"""Scheduler bookkeeping on synthetic runner outputs (no model): budgets, chunking, preemption,
static batching, priorities, stop conditions, and a randomized leak check."""
from __future__ import annotations

import random

import pytest
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
    s.check_invariants()
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
    s = make(blocks=5, bs=4)
    with pytest.raises(ValueError, match="KV"):
        s.add_request(request("big", 10, max_tokens=20))
    with pytest.raises(ValueError, match="context"):
        s.add_request(request("long", 300))


def group(rid: str, n_prompt: int, n: int, **params) -> list[Request]:
    """The core requests of one n-sample user request, as the input processor makes them."""
    tokens = request(rid, n_prompt).prompt_token_ids
    sp = SamplingParams(**params)
    return [Request(rid if i == 0 else f"{rid}#{i}", tokens, sp, eos_token_ids=(EOS,),
                    parent_id=f"{rid}" if i else None) for i in range(n)]


def test_samples_fork_the_computed_prompt_and_copy_the_shared_partial_block_on_write():
    s = make(bs=4)
    parent, *children = g = group("g", 10, 4, max_tokens=3, ignore_eos=True)
    for r in g:
        s.add_request(r)
    out, _ = step(s)  # only the parent computes the prompt: blocks 1, 2 full, 3 holds tokens 8, 9
    assert [(r.request_id, r.num_scheduled_tokens) for r in out.scheduled] == [("g", 10)]
    kvm = s.kv_cache_manager
    assert [kvm.block_ids(r.request_id) for r in g] == [[1, 2, 3]] * 4
    assert [kvm.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [4, 4, 4]  # the prompt is stored once
    assert [r.num_computed_tokens for r in children] == [9] * 3
    out, _ = step(s)
    # the parent writes position 10, each child recomputes position 9 (its own first logits);
    # each copies block 3 before writing, except the last holder, which writes in place.
    assert [(r.request_id, r.num_computed_tokens, r.num_scheduled_tokens) for r in out.scheduled] == [
        ("g", 10, 1), ("g#1", 9, 1), ("g#2", 9, 1), ("g#3", 9, 1)]
    assert out.blocks_to_copy == [(3, 4), (3, 5), (3, 6)]
    assert [kvm.block_ids(r.request_id) for r in g] == [[1, 2, 4], [1, 2, 5], [1, 2, 6], [1, 2, 3]]
    assert [kvm.pool.blocks[i].ref_cnt for i in range(1, 7)] == [4, 4, 1, 1, 1, 1]
    assert [r.num_output_tokens for r in g] == [2, 1, 1, 1]
    run_all(s)
    assert all(r.num_output_tokens == 3 for r in g)
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks) and kvm.num_free_blocks == 79


def test_samples_without_a_seat_run_on_their_own_through_the_prefix_cache():
    s = make(bs=4, seqs=2)
    g = group("g", 10, 4, max_tokens=2, ignore_eos=True)
    for r in g:
        s.add_request(r)
    step(s)
    assert [r.request_id for r in s.running] == ["g", "g#1"] and [r.request_id for r in s.waiting] == ["g#2", "g#3"]
    run_all(s)
    assert all(r.num_output_tokens == 2 for r in g)
    assert g[2].num_cached_prompt_tokens == 8  # the two full prompt blocks came from the prefix cache


def test_aborting_a_parent_before_its_prompt_is_computed_releases_its_samples():
    s = make(bs=4, budget=4)
    g = group("g", 10, 3, max_tokens=2, ignore_eos=True)
    for r in g:
        s.add_request(r)
    step(s)  # 4 of the 10 prompt tokens
    assert s.get_stats().num_waiting == 2 and not s.waiting
    s.abort_requests(["g"])
    assert [r.request_id for r in s.waiting] == ["g#1", "g#2"]
    s.abort_requests(["g#2"])
    run_all(s)
    assert g[1].num_output_tokens == 2 and g[2].status is RequestStatus.FINISHED_ABORTED
    assert all(b.ref_cnt == 0 for b in s.kv_cache_manager.pool.blocks)


def test_a_parent_that_stops_at_its_first_token_still_hands_its_prompt_over():
    s = make(bs=4)
    g = group("g", 6, 3, max_tokens=2, stop_token_ids=[7])
    for r in g:
        s.add_request(r)
    step(s, token=lambda r: 7 if r.request_id == "g" else 8)
    assert g[0].status is RequestStatus.FINISHED_STOPPED
    assert [s.kv_cache_manager.pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 2]
    run_all(s, token=lambda r: 8)
    assert [r.output_token_ids for r in g] == [[7], [8, 8], [8, 8]]


def beam_step(rid: str, tokens, parent: str | None = None) -> Request:
    """One step of a beam, as the beam search driver adds it."""
    return Request(rid, list(tokens), SamplingParams(max_tokens=1, ignore_eos=True), eos_token_ids=(EOS,),
                   parent_id=parent, hold_blocks=True)


def scheduled(out) -> list[tuple[str, int, int]]:
    return [(r.request_id, r.num_computed_tokens, r.num_scheduled_tokens) for r in out.scheduled]


def test_held_steps_keep_their_blocks_and_the_next_beams_fork_them():
    s = make(bs=4)
    kvm = s.kv_cache_manager
    refs = lambda ids: [kvm.pool.blocks[i].ref_cnt for i in ids]  # noqa: E731
    p = beam_step("p", request("p", 10).prompt_token_ids)
    s.add_request(p)
    out, _ = step(s)
    assert scheduled(out) == [("p", 0, 10)] and p.status is RequestStatus.FINISHED_LENGTH
    assert list(s.held) == ["p"] and not s.has_unfinished_requests()
    assert p.block_ids == [1, 2, 3] and refs([1, 2, 3]) == [1, 1, 1]  # block 3 holds tokens 8, 9

    a, b = beam_step("a", p.prompt_token_ids + [5], "p"), beam_step("b", p.prompt_token_ids + [6], "p")
    s.add_request(a)
    s.add_request(b)
    assert s.running == [a, b] and [a.num_computed_tokens, b.num_computed_tokens] == [10, 10]
    assert a.block_ids == b.block_ids == [1, 2, 3] and refs([1, 2, 3]) == [3, 3, 3]
    s.release_held(["p", "p", "unknown"])  # idempotent
    assert not s.held and refs([1, 2, 3]) == [2, 2, 2]
    s.check_invariants()
    out, _ = step(s)  # each writes position 10: a copies block 3, b is alone on it then
    assert scheduled(out) == [("a", 10, 1), ("b", 10, 1)]
    assert out.blocks_to_copy == [(3, 4)]
    assert a.block_ids == [1, 2, 4] and b.block_ids == [1, 2, 3] and refs([1, 2, 3, 4]) == [2, 2, 1, 1]
    assert list(s.held) == ["a", "b"]

    # two children of a parent still held: both writes copy
    c, d = beam_step("c", a.prompt_token_ids + [7], "a"), beam_step("d", a.prompt_token_ids + [8], "a")
    s.add_request(c)
    s.add_request(d)
    out, _ = step(s)
    assert scheduled(out) == [("c", 11, 1), ("d", 11, 1)]
    assert out.blocks_to_copy == [(4, 5), (4, 6)]
    assert c.block_ids == [1, 2, 5] and d.block_ids == [1, 2, 6] and refs([1, 2, 4, 5, 6]) == [4, 4, 1, 1, 1]
    s.release_held(["a", "b", "c", "d"])
    kvm.check_invariants([])
    assert all(blk.ref_cnt == 0 for blk in kvm.pool.blocks) and kvm.num_free_blocks == 79


def test_a_beam_without_a_seat_or_with_other_tokens_runs_as_an_ordinary_request():
    s = make(bs=4, seqs=1)
    p = beam_step("p", request("p", 10).prompt_token_ids)
    s.add_request(p)
    step(s)
    a, b = beam_step("a", p.prompt_token_ids + [5], "p"), beam_step("b", p.prompt_token_ids + [6], "p")
    other = beam_step("x", [p.prompt_token_ids[0] + 1] + p.prompt_token_ids[1:] + [5], "p")  # does not extend p's tokens
    same = beam_step("y", p.prompt_token_ids, "p")  # nothing of its own to compute
    for r in (a, b, other, same):
        s.add_request(r)
    assert s.running == [a] and list(s.waiting) == [b, other, same]
    s.release_held(["p"])
    outs = [scheduled(step(s)[0]) for _ in range(4)]
    assert outs[:2] == [[("a", 10, 1)], [("b", 8, 3)]]  # b: the full blocks from the prefix cache
    assert outs[2:] == [[("x", 0, 11)], [("y", 8, 2)]]
    s.release_held(list(s.held))
    assert s.kv_cache_manager.num_free_blocks == 79


def test_held_blocks_are_given_back_before_anything_waits_or_is_preempted_for_memory():
    s = make(bs=4, blocks=7)  # 6 usable blocks
    p, q = beam_step("p", range(1, 11)), beam_step("q", range(11, 15))
    s.add_request(p)
    s.add_request(q)
    step(s)
    assert list(s.held) == ["p", "q"] and s.kv_cache_manager.num_free_blocks == 2  # p: 3 blocks, q: 1
    other = request("o", 14, max_tokens=2)  # needs 4 blocks: p, the oldest, goes back first
    s.add_request(other)
    out, _ = step(s)
    assert scheduled(out) == [("o", 0, 14)] and list(s.held) == ["q"] and p.block_ids == []
    child = beam_step("c", list(range(1, 11)) + [5], "p")  # its parent's blocks are gone: ordinary
    s.add_request(child)
    assert child in s.waiting and child.block_ids == []
    run_all(s)
    assert s.num_preemptions_total == 0 and child.num_output_tokens == 1
    s.release_held(list(s.held))
    assert s.kv_cache_manager.num_free_blocks == 6


def test_aborted_or_failed_steps_hold_nothing():
    s = make(bs=4, budget=4)
    p, q = beam_step("p", range(1, 11)), beam_step("q", range(1, 7))
    s.add_request(p)
    s.add_request(q)
    step(s)  # p is mid-prompt, q waits
    s.abort_requests(["p"])
    s.finish_requests(["q"], RequestStatus.FINISHED_ERROR)
    assert not s.held and s.kv_cache_manager.num_free_blocks == 79
    r = beam_step("r", range(1, 4))
    s.add_request(r)
    step(s)
    with pytest.raises(ValueError, match="in use"):
        s.add_request(beam_step("r", range(1, 4)))  # held ids stay taken until released
    child = beam_step("c", range(1, 5), "r")
    s.add_request(child)
    s.abort_requests(["c"])  # a forked beam aborted before its step drops its references
    assert [s.kv_cache_manager.pool.blocks[i].ref_cnt for i in r.block_ids] == [1]
    s.release_held(["r"])
    assert s.kv_cache_manager.num_free_blocks == 79


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_adds_aborts_and_steps_leak_nothing(data):
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    s = make(budget=data.draw(st.sampled_from([8, 32, 128])), blocks=data.draw(st.integers(12, 40)), bs=4,
             seqs=data.draw(st.integers(1, 6)), max_len=64)
    shared = [rng.randrange(1, 500) for _ in range(12)]
    live, n = [], 0
    for _ in range(data.draw(st.integers(5, 60))):
        action = data.draw(st.sampled_from(["add", "add", "step", "step", "step", "abort", "beam", "release"]))
        if action == "beam" and s.held:  # a beam step forking a held request, or (held parent gone) not
            parent = rng.choice(list(s.held.values()))
            tokens = parent.all_token_ids[: parent.num_computed_tokens + rng.choice([0, 0, -1])]
            tokens += [rng.randrange(1, 500) for _ in range(rng.randint(1, 3))]
            r = Request(f"{n}#0", tokens, SamplingParams(max_tokens=1), eos_token_ids=(EOS,),
                        parent_id=parent.request_id, hold_blocks=True)
            n += 1
            try:
                s.add_request(r)
                live.append(r)
            except ValueError:
                pass
        elif action == "release" and s.held:
            s.release_held(rng.sample(list(s.held), rng.randint(1, len(s.held))))
        elif action in ("add", "beam"):
            prompt = (shared[: rng.randint(0, 12)] + [rng.randrange(1, 500) for _ in range(rng.randint(1, 20))])
            sp = SamplingParams(max_tokens=rng.randint(1, 10))
            samples = rng.choice([1, 1, 3])  # a parent and the samples that fork its prompt
            hold = samples == 1 and rng.random() < 0.5  # a first beam step, held when it finishes
            rs = [Request(f"{n}#{i}", prompt, sp, eos_token_ids=(EOS,), parent_id=f"{n}#0" if i else None,
                          hold_blocks=hold) for i in range(samples)]
            n += 1
            try:
                for r in rs:
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
    s.release_held(list(s.held))
    kvm = s.kv_cache_manager
    kvm.check_invariants([])
    assert not s.has_unfinished_requests()
    assert kvm.num_free_blocks == kvm.num_blocks - 1
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks)


# --- micro-batches: two steps in flight, as under two pipeline stages --------------------------------

def pipelined(s: Scheduler, token=lambda r: 7, limit=10_000, between=lambda: None):
    """Keep two steps in flight, update the oldest (as the engine under pipeline parallelism), and check
    that no request is in both. Returns every step's SchedulerOutput, in order."""
    outs, in_flight = [], []
    for _ in range(limit):
        if not s.has_unfinished_requests():
            return outs
        while len(in_flight) < 2:
            in_flight.append(s.schedule())
            outs.append(in_flight[-1])
        a, b = ({r.request_id for r in out.scheduled} for out in in_flight)
        assert not a & b, f"{a & b} scheduled while its previous step is in flight"
        out = in_flight.pop(0)
        toks = [[token(r)] if r.samples_this_step else [] for r in out.scheduled]
        s.update_from_output(out, RunnerOutput([r.request_id for r in out.scheduled], toks))
        s.check_invariants()
        between()
    raise AssertionError("did not finish")


def test_micro_batches_split_the_requests_evenly_and_take_turns():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=8, max_model_len=256),
                  CacheConfig(block_size=4), 80, num_micro_batches=2)
    reqs = [request(str(i), 10, max_tokens=5, ignore_eos=True) for i in range(7)]
    for r in reqs:
        s.add_request(r)
    outs = pipelined(s)
    assert [len(o.scheduled) for o in outs[:2]] == [4, 3]  # 7 requests: shares of 4 and 3
    assert {r.micro_batch for r in reqs[:4]} == {0} and {r.micro_batch for r in reqs[4:]} == {1}
    busy = [o for o in outs if o.scheduled]
    assert len(busy) == 10  # each micro-batch: its prompts, then 4 decodes
    assert all(r.num_output_tokens == 5 for r in reqs)
    # a late arrival joins the micro-batch with fewer requests
    late = [request("x", 6, max_tokens=3), request("y", 6, max_tokens=3)]
    s.add_request(late[0])
    s.add_request(late[1])
    outs = pipelined(s)
    assert [[r.request_id for r in o.scheduled] for o in outs[:2]] == [["x"], ["y"]]


def test_micro_batches_preempt_only_their_own_requests():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=256),
                  CacheConfig(block_size=4), 17, num_micro_batches=2)  # 16 usable blocks = 64 slots
    reqs = [request(str(i), 10, max_tokens=14, ignore_eos=True) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    outs = pipelined(s)
    assert s.num_preemptions_total > 0
    for prev, out in zip(outs, outs[1:]):  # `prev` is in flight while `out` is scheduled
        assert not out.preempted_request_ids & {r.request_id for r in prev.scheduled}
    assert all(r.num_output_tokens == 14 for r in reqs)
    assert s.kv_cache_manager.num_free_blocks == 16


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_random_micro_batches_with_aborts_in_flight_leak_nothing(data):
    rng = random.Random(data.draw(st.integers(0, 10**6)))
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=data.draw(st.sampled_from([8, 32, 128])),
                                  max_num_seqs=data.draw(st.integers(1, 6)), max_model_len=64),
                  CacheConfig(block_size=4, enable_prefix_caching=True), data.draw(st.integers(12, 40)),
                  num_micro_batches=2)
    shared = [rng.randrange(1, 500) for _ in range(12)]
    live = []
    for i in range(data.draw(st.integers(1, 12))):
        r = Request(str(i), shared[: rng.randint(0, 12)] + [rng.randrange(1, 500) for _ in range(rng.randint(1, 20))],
                    SamplingParams(max_tokens=rng.randint(1, 10), n=1), eos_token_ids=(EOS,))
        s.add_request(r)
        live.append(r)

    def abort_some():
        if live and rng.random() < 0.2:
            s.abort_requests([rng.choice(live).request_id])  # maybe in flight: its result is dropped

    pipelined(s, token=lambda r: rng.choice([EOS, 3, 4, 5, 6]), between=abort_some)
    assert s.kv_cache_manager.num_free_blocks == s.kv_cache_manager.num_blocks - 1
