"""Medusa heads and an EAGLE layer on the real SmolLM2-135M (its default quantized engine), greedy:
with speculation the tokens equal plain decoding, or first differ at a near-tie (as in
test_smollm2_ngram.py). The heads are untrained (Medusa's start: W_i = 0, so each head is the LM head
itself; EAGLE's layer random): exactness does not depend on them, only the acceptance rate, which a
trained file raises (benchmarks/RESULTS.md)."""
from __future__ import annotations

import pytest
import torch

from flashserve import LLM
from flashserve.model.loader import load_model_config
from flashserve.spec_decode.heads import build_heads, heads_config_for, save_heads
from tests.spec_decode.test_smollm2_ngram import PARAMS, PROMPTS, first_difference_is_a_near_tie



@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_greedy_with_heads_equals_plain_decoding(smollm2_gguf, tmp_path, method):
    cfg = heads_config_for(method, load_model_config(smollm2_gguf), "smollm2-135m", num_heads=3)
    torch.manual_seed(0)
    heads_file = tmp_path / f"{method}.safetensors"
    save_heads(heads_file, build_heads(cfg), cfg)
    kw = dict(model=smollm2_gguf, max_num_seqs=2)
    want = [o.outputs[0] for o in LLM(**kw).generate(PROMPTS, PARAMS, use_tqdm=False)]
    spec = LLM(**kw, speculative_config={"method": method, "model": str(heads_file), "num_speculative_tokens": 3})
    got = spec.generate(PROMPTS, PARAMS, use_tqdm=False)
    for w, g in zip(want, got):
        assert first_difference_is_a_near_tie(w, g.outputs[0])
    stats = spec.engine.get_stats()
    print(f"\n{method}: accepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts")
    assert stats.spec_draft_tokens_total > 0
