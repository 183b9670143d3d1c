"""KV swap bookkeeping, checked against a simulated KV cache: every block and swap slot holds the
(token, position) pairs written into it, the runner's copies are replayed in their order (swap out,
copy-on-write, swap in), and before each step every request's block table must hold its own tokens
at every computed position. Milliseconds, no model."""
from __future__ import annotations

import random

import pytest

from flashserve.config import CacheConfig, ModelConfig, SchedulerConfig
from flashserve.core.request import Request, RequestStatus
from flashserve.core.sched_output import RunnerOutput
from flashserve.core.scheduler import Scheduler
from flashserve.core.swap_space import decoder_params, min_tokens_per_swapped_block
from flashserve.sampling_params import SamplingParams

BS = 4


class SimulatedKV:
    """What the runner's tensors would hold: blocks[b][i] and slots[s][i] are (token, position)."""

    def __init__(self, num_blocks: int, num_slots: int):
        self.blocks = [[None] * BS for _ in range(num_blocks)]
        self.slots = [[None] * BS for _ in range(num_slots)]

    def run(self, out) -> None:
        for b, s in out.blocks_to_swap_out:
            self.slots[s] = list(self.blocks[b])
        for src, dst in out.blocks_to_copy:
            self.blocks[dst] = list(self.blocks[src])
        for s, b in out.blocks_to_swap_in:
            self.blocks[b] = list(self.slots[s])
        for r in out.scheduled:
            for p in range(r.num_computed_tokens):
                assert self.blocks[r.block_ids[p // BS]][p % BS] == (r.token_ids[p], p), (r.request_id, p)
            for p in range(r.num_computed_tokens, r.num_computed_tokens + r.num_scheduled_tokens):
                self.blocks[r.block_ids[p // BS]][p % BS] = (r.token_ids[p], p)


def make(mode="swap", blocks=13, slots=64, prefix=True, seqs=8, min_tokens=0.0) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=seqs, max_model_len=256,
                                     preemption_mode=mode),
                     CacheConfig(block_size=BS, enable_prefix_caching=prefix), blocks, slots, min_tokens)


def request(rid, prompt, max_tokens=12, parent=None, n=1) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=n), parent_id=parent)


def next_token(r) -> int:
    """A token that depends on the request's whole sequence, as a model's would."""
    return 1 + (sum(t * (i + 1) for i, t in enumerate(r.token_ids)) % 997)


def run(s: Scheduler, kv: SimulatedKV, limit=5000) -> int:
    """Step to the end; returns the tokens computed (the work a recompute repeats)."""
    computed = 0
    for _ in range(limit):
        if not s.has_unfinished_requests():
            return computed
        out = s.schedule()
        kv.run(out)
        computed += out.total_num_scheduled_tokens
        toks = [[next_token(r)] if r.samples_this_step else [] for r in out.scheduled]
        s.update_from_output(out, RunnerOutput([r.request_id for r in out.scheduled], toks))
        s.check_invariants()
    raise AssertionError("did not finish")


def prompts(seed=0, n=4, shared=0):
    rng = random.Random(seed)
    system = [rng.randrange(1, 500) for _ in range(shared)]
    return [system + [rng.randrange(1, 500) for _ in range(rng.randint(6, 12))] for _ in range(n)]


def outputs_and_work(mode, slots=64, shared=0, **kw):
    s = make(mode, slots=slots, **kw)
    kv = SimulatedKV(s.kv_cache_manager.num_blocks, slots)
    reqs = [request(str(i), p) for i, p in enumerate(prompts(shared=shared))]
    for r in reqs:
        s.add_request(r)
    work = run(s, kv)
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 12 for r in reqs)
    # Nothing leaks: every block back in the pool, every swap slot free.
    assert s.kv_cache_manager.num_free_blocks == s.kv_cache_manager.num_blocks - 1
    assert s.swap.num_free == s.swap.num_slots and not s.swap.req_slots
    return [r.output_token_ids for r in reqs], work, s


@pytest.mark.parametrize("prefix", [True, False])
def test_swapped_requests_resume_with_their_own_kv_and_compute_less(prefix):
    ref, work_recompute, s_re = outputs_and_work("recompute", prefix=prefix)
    got, work_swap, s = outputs_and_work("swap", prefix=prefix)
    assert s_re.num_preemptions_total > 0 and s_re.num_swapped_out_total == 0
    assert s.num_swapped_out_total == s.num_preemptions_total > 0
    assert got == ref
    assert work_swap < work_recompute  # the swapped tokens were not computed again


def test_full_swap_space_falls_back_to_recompute_and_loses_nothing():
    ref, _, _ = outputs_and_work("recompute")
    got, _, s = outputs_and_work("swap", slots=3)  # a victim of up to 5 blocks: some do not fit
    assert 0 < s.num_swapped_out_total < s.num_preemptions_total
    assert got == ref


def test_shared_prefix_blocks_swap_and_come_back_through_the_prefix_cache():
    ref, _, _ = outputs_and_work("recompute", shared=9)
    got, _, s = outputs_and_work("swap", shared=9)
    assert s.num_swapped_out_total > 0 and s.kv_cache_manager.prefix_hits > 0
    assert got == ref


def test_forked_samples_swap_their_shared_blocks():
    s = make("swap", blocks=12)
    kv = SimulatedKV(12, 64)
    parent = request("p", range(1, 10), max_tokens=16, n=3)
    reqs = [parent] + [request(f"p.{i}", range(1, 10), max_tokens=16, parent="p", n=3) for i in (1, 2)]
    for r in reqs:
        s.add_request(r)
    run(s, kv)
    assert s.num_swapped_out_total > 0
    assert all(r.num_output_tokens == 16 for r in reqs)
    assert s.kv_cache_manager.num_free_blocks == 11 and s.swap.num_free == 64


def test_aborting_a_swapped_out_request_frees_its_slots():
    s = make("swap", blocks=9)  # 8 usable blocks; each request grows to 6
    kv = SimulatedKV(9, 64)
    a, b = request("a", range(1, 11)), request("b", range(11, 21))
    s.add_request(a)
    s.add_request(b)
    while not s.swap.req_slots:
        out = s.schedule()
        kv.run(out)
        toks = [[next_token(r)] if r.samples_this_step else [] for r in out.scheduled]
        s.update_from_output(out, RunnerOutput([r.request_id for r in out.scheduled], toks))
    (victim,) = s.swap.req_slots
    assert s.requests[victim].status is RequestStatus.PREEMPTED and s.requests[victim].num_computed_tokens > 0
    s.abort_requests([victim])
    assert s.swap.num_free == 64
    s.check_invariants()


def test_auto_recomputes_when_the_cost_rule_says_so():
    _, _, s = outputs_and_work("auto", min_tokens=BS + 1)  # no block holds enough tokens to be worth a copy
    assert s.num_preemptions_total > 0 and s.num_swapped_out_total == 0
    _, _, s = outputs_and_work("auto", min_tokens=0.5)
    assert s.num_swapped_out_total == s.num_preemptions_total > 0


def test_cost_rule_swaps_real_models_and_counts_their_weights():
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV heads of 64, FFN 1536; a float16 block of 16 tokens.
    smollm2 = ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 8192)
    assert decoder_params(smollm2) == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # 106M of its 135M
    block_bytes = 2 * 30 * 16 * 3 * 64 * 2
    assert min_tokens_per_swapped_block(smollm2, block_bytes) < 0.5  # any victim with a token swaps
