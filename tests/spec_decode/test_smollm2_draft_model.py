"""The draft-model proposer on a real model: SmolLM2-135M drafting for itself, dequantized to float32
(the default engine rounds activations to int8, where verifying k + 1 positions in one chunk and
decoding one can round differently: see test_smollm2_ngram.py). Greedy outputs equal plain decoding
token for token, alone, batched, across prefix-cache hits and preemption, and nearly every draft is
accepted (the draft is the target: only a last-bit difference between the draft's decode path and
the target's verification path at a near-tie could reject one). At temperature > 0 a seeded
request's tokens are reproducible."""
from __future__ import annotations

import pytest

from flashserve import LLM, SamplingParams

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Once upon a time, in a small village by the mountains,",
    "import numpy as np\n\n# multiply two matrices\n",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
MIN_ACCEPTANCE = 0.95  # measured: 1.0


def engine(path, spec: bool, **kw):
    kw = {"dtype": "float32", "kv_cache_dtype": "float32", "quantization": "none", "block_size": 4, **kw}
    if spec:
        kw["speculative_config"] = {"method": "draft_model", "model": path, "num_speculative_tokens": 4}
    return LLM(model=path, **kw)


def tokens(llm, prompts, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def acceptance(llm) -> float:
    stats = llm.engine.get_stats()
    assert stats.spec_draft_tokens_total > 0
    return stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total


@pytest.fixture(scope="module")
def want(smollm2_gguf):
    return tokens(engine(smollm2_gguf, spec=False), PROMPTS)


@pytest.fixture(scope="module")
def spec(smollm2_gguf):
    return engine(smollm2_gguf, spec=True)


def test_alone_then_batched_with_prefix_hits(spec, want):
    """Two prompts alone, then all together: the batch finds the first two prompts' full blocks in
    the target's prefix cache and in the draft's."""
    assert [tokens(spec, [p])[0] for p in PROMPTS[:2]] == want[:2]
    assert tokens(spec, PROMPTS) == want
    assert spec.engine.get_stats().prefix_cache_hits > 0
    assert spec.engine.proposer.kv_cache_manager.prefix_hits > 0
    print(f"\nacceptance {acceptance(spec):.3f}")
    assert acceptance(spec) >= MIN_ACCEPTANCE


def test_preemption(smollm2_gguf, want):
    """A KV pool of 12 blocks of 4 tokens for four requests of up to 34 tokens: requests are preempted
    and recomputed (the draft's pool, as many blocks, runs short too)."""
    block_bytes = 2 * 30 * 4 * 3 * 64 * 4  # K and V, layers, block, kv heads, head_dim, float32
    llm = engine(smollm2_gguf, spec=True, kv_cache_memory=12 * block_bytes)
    assert tokens(llm, PROMPTS) == want
    assert llm.engine.get_stats().num_preemptions_total > 0
    assert acceptance(llm) >= MIN_ACCEPTANCE
    assert llm.engine.get_stats().kv_blocks_used == 0


def test_seeded_sampling_is_reproducible(spec):
    """temperature > 0: a seeded request gives the same tokens alone and beside other requests
    (drafts are verified by rejection sampling: some accepted, some not)."""
    seeded = SamplingParams(temperature=1.0, seed=11, max_tokens=16, ignore_eos=True)
    before = spec.engine.get_stats()
    alone = tokens(spec, [PROMPTS[0]], seeded)[0]
    others = [SamplingParams(temperature=1.0, seed=i, max_tokens=16) for i in range(len(PROMPTS) - 1)]
    assert tokens(spec, PROMPTS, [seeded, *others])[0] == alone
    after = spec.engine.get_stats()
    drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
    accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
    print(f"\ntemperature 1: accepted {accepted} of {drafted} drafts")
    assert 0 < accepted < drafted
