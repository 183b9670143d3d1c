"""Prompt-lookup speculation in the whole engine on the tiny random Llama (float32, no quantization):
greedy outputs equal plain decoding token for token, with drafts actually accepted, alone and mixed
with other requests' prefill chunks, with prefix caching, under forced preemption, at stop strings and
max_tokens boundaries, with logprobs; the KV blocks of rejected drafts go back to the pool.

Exactness: plain decoding scores one position per request and step, verification k + 1 positions in
one chunk through the prefill attention path; both are float32 on the same weights, and on this
model's 256-token vocabulary no greedy choice is close enough to a tie for the summation order to
decide it (checked by the tests themselves: they would fail)."""
from __future__ import annotations

import random

import pytest

from flashserve import LLM, SamplingParams

SPEC = dict(speculative_method="ngram", num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)


def prompts(n=10, seed=0):
    rng = random.Random(seed)
    out = [[rng.randrange(20, 250) for _ in range(rng.randint(3, 60))] for _ in range(n)]
    # Repetitive prompts: prompt lookup has something to copy from the start.
    out += [[5, 6, 7, 8, 9] * 6, [30, 31, 32, 33] * 5 + [30, 31], list(range(40, 60)) * 3]
    return out


def generate(llm, ps, params):
    return llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)


def engine(path, spec: bool, **kw):
    kw = {"dtype": "float32", "kv_cache_dtype": "float32", "block_size": 4, **kw}  # budgets below count fp32 blocks
    return LLM(model=path, **kw, **(SPEC if spec else {}))


def assert_no_leak(llm):
    kvm = llm.engine.scheduler.kv_cache_manager
    kvm.check_invariants([])
    assert all(b.ref_cnt == 0 for b in kvm.pool.blocks)
    assert llm.engine.get_stats().kv_blocks_used == 0


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    return engine(tiny_llama[0], spec=False)


@pytest.fixture(scope="module")
def plain_out(plain):
    return [o.outputs[0].token_ids for o in generate(plain, prompts(), GREEDY)]


@pytest.mark.parametrize("kw", [
    dict(),  # everything in one step, prefix caching on (the default)
    dict(enable_prefix_caching=False, max_num_seqs=1),  # alone
    dict(max_num_batched_tokens=24),  # drafts share small budgets with prompt chunks
])
def test_greedy_equals_plain_decoding(tiny_llama, plain_out, kw):
    llm = engine(tiny_llama[0], spec=True, **kw)
    got = [o.outputs[0].token_ids for o in generate(llm, prompts(), GREEDY)]
    assert [i for i, (a, b) in enumerate(zip(plain_out, got)) if a != b] == []
    stats = llm.engine.get_stats()
    assert stats.spec_accepted_tokens_total > 0
    assert stats.spec_draft_tokens_total > stats.spec_accepted_tokens_total  # some were rejected too
    print(f"\n{kw}: accepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts")
    assert_no_leak(llm)


def test_prefix_cache_hits_and_preemption(tiny_llama, plain_out):
    """Run the prompts twice (the second round hits the prefix cache) in a KV pool small enough to
    preempt: outputs still equal plain decoding."""
    # 40 blocks of 4 tokens: the longest request (60 + 40 tokens) needs 25, the 13 together far more.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # K and V, layers, block, kv heads, head_dim, float32
    llm = engine(tiny_llama[0], spec=True, kv_cache_memory=40 * block_bytes)
    for _ in range(2):
        got = [o.outputs[0].token_ids for o in generate(llm, prompts(), GREEDY)]
        assert got == plain_out
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0
    assert stats.prefix_cache_hits > 0
    assert stats.spec_accepted_tokens_total > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 7])
def test_max_tokens_is_never_passed(tiny_llama, plain, max_tokens):
    p = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ps = prompts()[-3:]
    want = [o.outputs[0].token_ids for o in generate(plain, ps, p)]
    llm = engine(tiny_llama[0], spec=True)  # repetitive prompts: drafts from the first decode step
    got = generate(llm, ps, p)
    assert [o.outputs[0].token_ids for o in got] == want
    assert all(o.outputs[0].finish_reason == "length" for o in got)
    assert_no_leak(llm)


def test_stop_strings_and_stop_tokens_inside_an_accepted_run(tiny_llama, plain, plain_out):
    """A stop string or stop token completed in the middle of a run of accepted drafts ends the
    output there, as plain decoding does (text, tokens and finish reason equal)."""
    tok = plain.get_tokenizer()
    ps = prompts()
    i = next(j for j, o in enumerate(plain_out) if len(set(o)) < 15)  # a looping output: drafts accepted
    out = plain_out[i]
    stop_token = out[20]
    stop_text = tok.decode(list(out[18:21]))
    cases = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop_text]),
             SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop_text],
                            include_stop_str_in_output=True),
             SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_token])]
    llm = engine(tiny_llama[0], spec=True)
    for p in cases:
        a, b = generate(plain, ps, p), generate(llm, ps, p)
        for x, y in zip(a, b):
            x, y = x.outputs[0], y.outputs[0]
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == \
                   (y.token_ids, y.text, y.finish_reason, y.stop_reason)
    assert llm.engine.get_stats().spec_accepted_tokens_total > 0
    assert_no_leak(llm)


def test_logprobs_are_the_targets(tiny_llama, plain):
    p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3)
    ps = prompts()[-3:]
    want = generate(plain, ps, p)
    llm = engine(tiny_llama[0], spec=True)
    got = generate(llm, ps, p)
    assert llm.engine.get_stats().spec_accepted_tokens_total > 0
    for x, y in zip(want, got):
        x, y = x.outputs[0], y.outputs[0]
        assert x.token_ids == y.token_ids and len(y.logprobs) == len(y.token_ids)
        for ex, ey in zip(x.logprobs, y.logprobs):
            assert list(ex) == list(ey)
            assert all(abs(ex[t].logprob - ey[t].logprob) < 1e-4 and ex[t].rank == ey[t].rank for t in ex)
        assert abs(x.cumulative_logprob - y.cumulative_logprob) < 1e-3


def test_rejected_blocks_are_rolled_back(tiny_llama):
    """After every step each request holds exactly the blocks of its computed tokens (the KV of
    rejected drafts gave its blocks back), and nothing after the run."""
    llm = engine(tiny_llama[0], spec=True, enable_prefix_caching=False)
    eng = llm.engine
    for i, p in enumerate(prompts()):
        eng.add_request(str(i), {"prompt_token_ids": p}, GREEDY)
    kvm = eng.scheduler.kv_cache_manager
    while eng.has_unfinished_requests():
        eng.step()
        for r in eng.scheduler.running:
            assert len(kvm.block_ids(r.request_id)) == -(-r.num_computed_tokens // 4)
            assert r.block_ids == kvm.block_ids(r.request_id)
        eng.scheduler.check_invariants()
    stats = eng.get_stats()
    assert stats.spec_draft_tokens_total > stats.spec_accepted_tokens_total > 0
    assert_no_leak(llm)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_llama):
    """temperature > 0: a seeded request's tokens depend on its seed only, not on its neighbours,
    and n > 1 samples speculate each on their own."""
    ps = prompts()
    p = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=30, ignore_eos=True)
    llm = engine(tiny_llama[0], spec=True)
    alone = generate(llm, [ps[-1]], p)[0].outputs[0].token_ids
    batched = generate(llm, ps, p)[-1].outputs[0].token_ids
    assert alone == batched
    n = generate(llm, [ps[-1]], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=20, ignore_eos=True))
    assert len({c.token_ids for c in n[0].outputs}) == 3
    assert n[0].metrics["spec_draft_tokens"] > 0
    assert_no_leak(llm)


@pytest.mark.parametrize("bad,match", [
    (dict(speculative_method="lookahead"), "unknown speculative method"),
    (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative_method="ngram", prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
])
def test_bad_configuration_fails_at_start_up(tiny_llama, bad, match):
    with pytest.raises(ValueError, match=match):
        LLM(model=tiny_llama[0], dtype="float32", **bad)


def test_proposer_time_is_counted_and_exported(tiny_llama, plain):
    """The engine adds up the wall time its proposer spends drafting (none without one), within the
    generate call's own wall time, and the server's /metrics exports it."""
    import time

    from prometheus_client import generate_latest

    from flashserve.entrypoints.metrics import ServerMetrics

    spec = engine(tiny_llama[0], spec=True)
    start = time.perf_counter()
    generate(spec, prompts(), GREEDY)
    took = time.perf_counter() - start
    stats = spec.engine.get_stats()
    assert stats.spec_draft_tokens_total > 0
    assert 0 < stats.spec_propose_seconds_total < took
    generate(plain, prompts(2), GREEDY)
    assert plain.engine.get_stats().spec_propose_seconds_total == 0
    metrics = ServerMetrics()
    metrics.refresh(stats)
    text = generate_latest(metrics.registry).decode()
    line = next(ln for ln in text.splitlines() if ln.startswith("flashserve_spec_decode_proposer_seconds "))
    assert float(line.split()[1]) == stats.spec_propose_seconds_total
