"""n > 1 samples share the prompt's KV blocks through reference counts: sample 0 computes the
prompt, the others fork its block table (the partly filled last block included) and copy a
shared block only when they write into it. Forking must not change what is sampled: the n
samples equal n separate requests seeded seed + i, and no block outlives its requests."""
from __future__ import annotations

import pytest

from flashserve import LLM, SamplingParams

PROMPT = list(range(20, 50))  # 30 tokens: 7 full blocks of 4 and a partial one holding 2
N = 4


def params(seed, n=1, **kw):
    return SamplingParams(n=n, temperature=1.0, seed=seed, max_tokens=10, ignore_eos=True, **kw)


def run(eng, rid, prompt, p):
    eng.add_request(rid, {"prompt_token_ids": prompt}, p)
    final = None
    while eng.has_unfinished_requests():
        final = next((o for o in eng.step() if o.request_id == rid and o.finished), final)
    return final


def assert_no_leak(eng):
    kvm = eng.scheduler.kv_cache_manager
    kvm.check_invariants([])
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks)  # free, or kept only as prefix-cache content


@pytest.mark.parametrize("kv_cache_dtype,caching", [("auto", True), ("auto", False), ("int8", True)])
def test_forked_samples_store_the_prompt_once_and_equal_separate_requests(tiny_llama, kv_cache_dtype, caching):
    llm = LLM(model=tiny_llama[0], dtype="float32", block_size=4, kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=caching)
    eng = llm.engine
    kvm = eng.scheduler.kv_cache_manager
    eng.add_request("g", {"prompt_token_ids": PROMPT}, params(5, n=N, logprobs=0))
    eng.step()  # sample 0 computes the prompt; the others fork it
    tables = [kvm.block_ids(f"g#{i}") for i in range(N)]
    assert len(tables[0]) == 8 and all(t == tables[0] for t in tables)
    assert [kvm.pool.blocks[b].ref_cnt for b in tables[0]] == [N] * 8
    used = kvm.num_blocks - 1 - kvm.num_free_blocks
    assert used == 8
    out = None
    while eng.has_unfinished_requests():
        out = next((o for o in eng.step() if o.finished), out)
    forked = [c.token_ids for c in out.outputs]
    assert len(set(forked)) == N and all(len(t) == 10 for t in forked)
    assert_no_leak(eng)

    ref = LLM(model=tiny_llama[0], dtype="float32", block_size=4, kv_cache_dtype=kv_cache_dtype,
              enable_prefix_caching=False).engine
    alone = [run(ref, f"r{i}", PROMPT, params(5 + i, logprobs=0)).outputs[0] for i in range(N)]
    assert forked == [c.token_ids for c in alone]
    for a, b in zip(out.outputs, alone):
        assert abs(a.cumulative_logprob - b.cumulative_logprob) < 1e-3


def test_abort_while_samples_wait_or_share_blocks_leaks_nothing(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", block_size=4, max_num_batched_tokens=8)
    eng = llm.engine
    eng.add_request("a", {"prompt_token_ids": PROMPT}, params(1, n=3))  # aborted mid-prompt
    eng.add_request("b", {"prompt_token_ids": PROMPT[::-1]}, params(2, n=3))  # aborted after the fork
    eng.step()
    assert eng.get_stats().num_waiting == 5  # a's samples wait for its prompt, b waits whole
    eng.abort_request("a")
    for _ in range(8):
        eng.step()
    kvm = eng.scheduler.kv_cache_manager
    assert kvm.pool.blocks[kvm.block_ids("b#0")[0]].ref_cnt == 3
    eng.abort_request("b")
    assert not eng.has_unfinished_requests()
    assert_no_leak(eng)


def test_best_of_samples_fork_too(tiny_llama):
    llm = LLM(model=tiny_llama[0], dtype="float32", block_size=4)
    out = llm.generate([PROMPT], params(9, n=2, best_of=4), use_tqdm=False)[0]
    every = llm.generate([PROMPT], params(9, n=4, logprobs=0), use_tqdm=False)[0]
    ranked = sorted(every.outputs, key=lambda c: -c.cumulative_logprob)
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ranked[:2]]
    assert_no_leak(llm.engine)
