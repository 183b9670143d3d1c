"""SmolLM2-135M split over two ranks (9 query heads, 3 KV heads: 2 | 1 KV groups) against one
process and against transformers' own reading of the GGUF file."""
from __future__ import annotations

import pytest
import torch

from flashserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "List three primary colors:\n1.",
]
MAX_TOKENS = 24
LOGPROB_TOL = 2e-3  # as tests/engine/test_greedy_vs_hf.py: float32, summation order only


def test_float32_tp2_matches_one_process_and_transformers(smollm2_gguf, smollm2_llm, hf_smollm2):
    """Dequantized float32 weights: TP=2 greedy tokens equal one process's, and every top-5 logprob
    is within 2e-3 of transformers' forward of prompt + completion."""
    model, _ = hf_smollm2
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=5, ignore_eos=True)
    one = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(model=smollm2_gguf, dtype="float32", kv_cache_dtype="float32", quantization="none", max_model_len=512,
              tensor_parallel_size=2)
    try:
        two = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llm.engine.shutdown()
    for a, b in zip(one, two):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        ids = list(b.prompt_token_ids) + list(b.outputs[0].token_ids)
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, len(b.prompt_token_ids) - 1 : -1].float(), -1)
        for j, entry in enumerate(b.outputs[0].logprobs):
            for t, lp in entry.items():
                assert abs(lp.logprob - ref[j, t].item()) < LOGPROB_TOL, (b.prompt, j, t)


def test_quantized_tp2_batched_with_preemption_and_prefix_hits(smollm2_gguf):
    """The file's 4-bit codes (weight-only: float activations), 8 requests batched in a KV pool too
    small for all of them (so some are preempted and recomputed), prompts sharing a long prefix
    (prefix cache hits): TP=2 gives one process's greedy tokens under the same schedule.
    Not with int8 activations (quantization="auto"): there the all-reduce's other summation order
    can move an activation across an int8 rounding step, and a near-tie then falls the other way
    (seen once here, 23 tokens in), as README says of prefix hits and chunking in one process."""
    shared = "You are a helpful assistant. Answer briefly and precisely, in one sentence. " * 3
    prompts = [shared + p for p in PROMPTS * 2]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    kwargs = dict(max_model_len=256, block_size=16, kv_cache_memory=28 * 16 * 2 * 30 * 3 * 64 * 2)  # 28 float16 blocks
    outs, stats = [], []
    for tp in (1, 2):
        llm = LLM(model=smollm2_gguf, quantization="weight-only", tensor_parallel_size=tp, **kwargs)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            stats.append(llm.engine.get_stats())
        finally:
            llm.engine.shutdown()
    assert outs[1] == outs[0]
    assert stats[1].num_preemptions_total > 0 and stats[1].prefix_cache_hits > 0
