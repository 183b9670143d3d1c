"""Typical acceptance (speculative_config acceptance="typical") in the whole engine on the tiny random
Llama with the Medusa heads and EAGLE layer of test_engine_heads.py: greedy outputs still equal plain
decoding token for token; sampled outputs (top-k 3) only hold tokens in the target's top 3 after
their own prefix, checked against transformers; on the same seeded workload, typical acceptance
accepts a larger share of its (argmax) drafts than rejection sampling of drafts sampled from the
heads; bad settings fail at start-up with errors naming them."""
from __future__ import annotations

import pytest
import torch

from flashserve import LLM, SamplingParams
from tests.spec_decode.test_engine_heads import K, heads  # noqa: F401 (heads: a fixture)
from tests.spec_decode.test_engine_ngram import (  # noqa: F401 (plain: plain_out's fixture)
    GREEDY, assert_no_leak, generate, plain, plain_out, prompts)

TOP_K = 3


def engine(path, heads_file, method, acceptance, **kw):
    spec = {"method": method, "model": heads_file, "num_speculative_tokens": K, "adaptive": False,
            "acceptance": acceptance}
    return LLM(model=path, speculative_config=spec, dtype="float32", kv_cache_dtype="float32", block_size=4, **kw)


def acceptance_rate(llm) -> float:
    stats = llm.engine.get_stats()
    assert stats.spec_draft_tokens_total > 0
    return stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_greedy_equals_plain_decoding(tiny_llama, heads, plain_out, method):
    llm = engine(tiny_llama[0], heads[method], method, "typical")
    got = [o.outputs[0].token_ids for o in generate(llm, prompts(), GREEDY)]
    assert [i for i, (a, b) in enumerate(zip(plain_out, got)) if a != b] == []
    assert 0 < acceptance_rate(llm) < 1
    assert_no_leak(llm)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_sampled_tokens_stay_in_the_targets_top_k(tiny_llama, heads, method):
    """Not lossless, but never outside what the target's processed p allows: each emitted token
    is among transformers' top 3 after its prefix. Typical accepts more of its drafts than rejection."""
    path, hf = tiny_llama
    params = [SamplingParams(temperature=1.0, top_k=TOP_K, max_tokens=24, ignore_eos=True, seed=s) for s in range(13)]
    rates = {}
    for acceptance in ("rejection", "typical"):
        llm = engine(path, heads[method], method, acceptance)
        outs = generate(llm, prompts(), params)
        rates[acceptance] = acceptance_rate(llm)
        assert_no_leak(llm)
    print(f"\n{method}: accepted share of drafts {rates}")
    assert rates["typical"] > rates["rejection"]
    with torch.no_grad():
        for o in outs:  # the typical run's
            prompt, out = list(o.prompt_token_ids), list(o.outputs[0].token_ids)
            logits = hf(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1]  # (len(out), vocab)
            kth = logits.topk(TOP_K).values[:, -1]
            chosen = logits[torch.arange(len(out)), torch.tensor(out)]
            assert bool((chosen >= kth - 1e-4).all()), (prompt, out)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_seeded_sampling_is_reproducible(tiny_llama, heads, method):
    """Argmax drafts and one noise row per step from the request's generator: the same seed gives the
    same tokens, alone or batched (no prefix caching: EAGLE's drafts depend on the rows it saw)."""
    llm = engine(tiny_llama[0], heads[method], method, "typical", enable_prefix_caching=False)
    p = SamplingParams(temperature=0.8, max_tokens=30, seed=7, ignore_eos=True)
    alone = generate(llm, prompts()[:1], p)[0].outputs[0].token_ids
    batched = generate(llm, prompts()[:6], [p] + [SamplingParams(temperature=0.8, max_tokens=30)] * 5)
    assert batched[0].outputs[0].token_ids == alone


@pytest.mark.parametrize("spec,message", [
    (dict(acceptance="greedy"), "unknown speculative acceptance 'greedy'"),
    (dict(acceptance="typical", posterior_threshold=2.0), r"posterior_threshold .* must be in \[0, 1\]"),
    (dict(posterior_threshold=0.1), "add acceptance='typical'"),
    (dict(acceptance="typical", posterior_alpha=-0.5), "posterior_alpha"),
])
def test_bad_settings_fail_at_start_up(tiny_llama, spec, message):
    with pytest.raises(ValueError, match=message):
        LLM(model=tiny_llama[0], dtype="float32", speculative_config={"method": "ngram", **spec})
