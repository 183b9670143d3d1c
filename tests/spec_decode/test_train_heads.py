"""`flashserve train-heads` end to end on a tiny random Llama with SmolLM2's whole vocabulary (so that
the chat-formatted prompts of train_prompts.txt tokenize into it): the engine answers the prompts,
the heads train, the files are written, and an engine loading them decodes greedily exactly as
without them."""
from __future__ import annotations

import json

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.entrypoints.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny_full_vocab(tmp_path_factory, hf_smollm2_tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(hf_smollm2_tokenizer), hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("tiny_full_vocab")
    tf.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    hf_smollm2_tokenizer.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_train_heads_command_writes_heads_the_engine_loads(tiny_full_vocab, tmp_path, method):
    out = tmp_path / f"{method}.safetensors"
    assert cli_main(["train-heads", "--model", tiny_full_vocab, "--method", method, "--out", str(out),
                     "--num-prompts", "8", "--max-tokens", "16", "--epochs", "1", "--temperatures", "0,1",
                     "--num-heads", "2"]) in (0, None)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["method"], meta["hidden_size"], meta["vocab_size"]) == (method, 64, 49152)
    assert meta["training"]["answers"] == 16 and meta["training"]["answer_tokens"] == 16 * 16
    prompts = ["Why is the sky blue?", "Write a haiku about rain."]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_dtype="float32")
    want = [o.outputs[0].token_ids for o in LLM(model=tiny_full_vocab, **kw).generate(prompts, greedy, use_tqdm=False)]
    llm = LLM(model=tiny_full_vocab, speculative_config={"method": method, "model": str(out),
                                                         "num_speculative_tokens": 2}, **kw)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == want
    assert llm.engine.get_stats().spec_draft_tokens_total > 0
