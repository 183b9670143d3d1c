"""Guided decoding through preemption: a recomputed request's matcher carries on from the tokens it
already has (the runner keeps it across preemption and feeds it only new tokens), so the output is
the one it gives without preemption and still matches its grammar."""
from __future__ import annotations

import random
import re

from flashserve import LLM, SamplingParams
from flashserve.sampling_params import GuidedDecodingParams
from tests.model.tiny import VOCAB

PATTERN = "[a-z]{30}"  # a random model's greedy letters: the grammar decides where it ends


def run(path, prompts, **engine_kwargs):
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, max_num_batched_tokens=128,
              max_model_len=128, **engine_kwargs)
    params = SamplingParams(temperature=0, max_tokens=60, guided_decoding=GuidedDecodingParams(regex=PATTERN))
    return llm, [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_preempted_guided_requests_match_their_grammar_and_the_unpreempted_run(tiny_llama):
    path, _ = tiny_llama
    rng = random.Random(4)
    prompts = [[rng.randrange(VOCAB) for _ in range(30)] for _ in range(3)]
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # K and V, 2 layers, block of 4, 2 kv heads, head_dim 16, fp32
    _, alone = run(path, prompts)
    llm, squeezed = run(path, prompts, kv_cache_memory=30 * block_bytes)
    assert llm.engine.get_stats().num_preemptions_total > 0
    for a, b in zip(alone, squeezed):
        assert re.fullmatch(PATTERN, b.text) and b.finish_reason == "stop", b.text
        assert a.token_ids == b.token_ids
    llm.engine.step()  # the finished ids reach the runner with the next step
    assert not llm.engine.guided._followers
