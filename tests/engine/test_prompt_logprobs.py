"""prompt_logprobs: for every prompt token after the first, its logprob given the tokens before
it, its rank in the vocabulary and the top-N alternatives, against log_softmax of transformers'
logits; under chunked prefill, with a warm prefix cache, with n > 1 and in a mixed batch."""
from __future__ import annotations

import random

import pytest
import torch

from flashserve import LLM, SamplingParams
from tests.model.tiny import VOCAB

TOP = 3


def reference(hf, prompt: list[int]) -> torch.Tensor:
    """(len(prompt) - 1, vocab) float64: row p - 1 = log P(. | prompt[:p])."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].double(), -1)


def check(prompt_logprobs, prompt: list[int], ref: torch.Tensor, top: int, atol: float) -> None:
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        entry, row, tok = prompt_logprobs[p], ref[p - 1], prompt[p]
        assert abs(entry[tok].logprob - row[tok].item()) < atol, p
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1, p
        want = row.topk(top)
        others = {t: lp for t, lp in entry.items() if t != tok}
        assert set(others) <= set(want.indices.tolist()) and len(entry) in (top, top + 1)
        for rank, (t, v) in enumerate(zip(want.indices.tolist(), want.values.tolist()), start=1):
            assert abs(entry[t].logprob - v) < atol and (t == tok or entry[t].rank == rank)


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in (37, 5, 2, 64)]


@pytest.mark.parametrize("budget", [4096, 7])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny_llama, prompts, budget):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, max_num_batched_tokens=budget)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=TOP)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        check(out.prompt_logprobs, prompt, reference(hf, prompt), TOP, 1e-4)
        assert len(out.outputs[0].token_ids) == 3


def test_zero_top_gives_the_prompt_token_only_and_others_get_none(tiny_llama, prompts):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, max_num_batched_tokens=16)
    outs = llm.generate(prompts, [SamplingParams(max_tokens=2, prompt_logprobs=0 if i % 2 else None)
                                  for i in range(len(prompts))], use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        if i % 2 == 0:
            assert out.prompt_logprobs is None
            continue
        assert [list(e) for e in out.prompt_logprobs[1:]] == [[t] for t in prompt[1:]]
        check(out.prompt_logprobs, prompt, reference(hf, prompt), 0, 1e-4)


def test_cached_prefix_is_recomputed_for_prompt_logprobs(tiny_llama, prompts):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, max_num_batched_tokens=64)
    prompt = prompts[3]
    warm = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    again = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert warm.num_cached_tokens == 0 and again.num_cached_tokens == 60  # the cache holds the prompt
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=TOP), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, prompt, reference(hf, prompt), TOP, 1e-4)


def test_n_samples_report_the_prompt_logprobs_once(tiny_llama, prompts):
    path, hf = tiny_llama
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, max_num_batched_tokens=8)
    out = llm.generate([prompts[0]], SamplingParams(n=3, seed=1, max_tokens=4, prompt_logprobs=1),
                       use_tqdm=False)[0]
    assert len(out.outputs) == 3
    check(out.prompt_logprobs, prompts[0], reference(hf, prompts[0]), 1, 1e-4)


def test_preemption_after_the_prompt_keeps_prompt_logprobs_right(tiny_llama):
    path, hf = tiny_llama
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB) for _ in range(40)] for _ in range(3)]
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4  # K and V, 2 layers, block of 4, 2 kv heads, head_dim 16, fp32
    llm = LLM(model=path, dtype="float32", kv_cache_dtype="float32", block_size=4, max_num_batched_tokens=128,
              max_model_len=128,
              kv_cache_memory=40 * block_bytes)
    outs = llm.generate(prompts, SamplingParams(max_tokens=60, ignore_eos=True, prompt_logprobs=2), use_tqdm=False)
    assert llm.engine.get_stats().num_preemptions_total > 0
    for prompt, out in zip(prompts, outs):
        check(out.prompt_logprobs, prompt, reference(hf, prompt), 2, 1e-4)


@pytest.mark.slow
def test_smollm2_prompt_logprobs_under_forced_chunking(smollm2_gguf, hf_smollm2):
    hf, tok = hf_smollm2
    prompt = tok("The history of the printing press begins in the fifteenth century, when").input_ids
    llm = LLM(model=smollm2_gguf, dtype="float32", kv_cache_dtype="float32", quantization="none",
              max_num_batched_tokens=5)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=5), use_tqdm=False)[0]
    check(out.prompt_logprobs, prompt, reference(hf, prompt), 5, 2e-3)
