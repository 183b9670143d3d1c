"""The real draft/target pair (slow): Qwen2.5-Coder-0.5B drafting for Qwen2.5-Coder-1.5B on the
default quantized engine, greedy, two code-writing chat prompts batched. With speculation the tokens
equal plain decoding, or first differ at a near-tie (int8-rounded activations: verification scores
k + 1 positions through the prefill path, plain decoding one through the decode path; see
test_smollm2_ngram.py). Prints the acceptance rate."""
from __future__ import annotations

import gc

import pytest

from flashserve import LLM, SamplingParams
from tests.spec_decode.test_smollm2_ngram import first_difference_is_a_near_tie

pytestmark = pytest.mark.slow

MESSAGES = [
    [{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome, "
                                 "ignoring case and punctuation."}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number iteratively."}],
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5)
MIN_ACCEPTANCE = 0.5  # measured on these prompts: 0.82 (32 tokens), 0.92 (128 tokens)


def test_greedy_with_the_qwen_draft_equals_plain_decoding(qwen15_gguf, qwen05_gguf):
    kw = dict(model=qwen15_gguf, max_num_seqs=2, max_model_len=1024)
    plain = LLM(**kw)
    want = [o.outputs[0] for o in plain.chat(MESSAGES, PARAMS, use_tqdm=False)]
    del plain  # one 1.5B engine at a time
    gc.collect()
    spec = LLM(**kw, speculative_config={"method": "draft_model", "model": qwen05_gguf, "num_speculative_tokens": 4})
    got = spec.chat(MESSAGES, PARAMS, use_tqdm=False)
    for w, g in zip(want, got):
        assert first_difference_is_a_near_tie(w, g.outputs[0])
    stats = spec.engine.get_stats()
    rate = stats.spec_accepted_tokens_total / stats.spec_draft_tokens_total
    print(f"\naccepted {stats.spec_accepted_tokens_total} of {stats.spec_draft_tokens_total} drafts ({rate:.0%})")
    assert rate >= MIN_ACCEPTANCE
