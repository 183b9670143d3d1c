"""Prompt lookup on the real SmolLM2-135M (its default quantized engine and float32), greedy, on a
code-editing prompt that repeats its input: with speculation the tokens equal plain decoding, or
first differ at a near-tie (verification scores k + 1 positions in one chunk through the prefill
attention path, plain decoding one through the decode path; with int8-rounded activations a last-bit
difference can cross a rounding step, as in tests/engine/test_batching.py). Prints the acceptance rate."""
from __future__ import annotations

import pytest

from flashserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

NEAR_TIE_NATS = 0.5  # as tests/engine/test_batching.py

CODE = '''def add(a, b):
    return a + b


def sub(a, b):
    return a - b


def mul(a, b):
    return a * b
'''
PROMPTS = [
    f"Rewrite this Python module with type hints on every function.\n\n{CODE}\nThe module with type hints:\n\n",
    f"Here is a module:\n\n{CODE}\nHere is the same module again, unchanged:\n\n",
]
PARAMS = SamplingParams(temperature=0.0, max_tokens=64, logprobs=5)


def first_difference_is_a_near_tie(ref, got) -> bool:
    i = next((j for j, (a, b) in enumerate(zip(ref.token_ids, got.token_ids)) if a != b), None)
    if i is None:
        return ref.token_ids == got.token_ids
    top = ref.logprobs[i]
    gap = top[ref.token_ids[i]].logprob - top[got.token_ids[i]].logprob if got.token_ids[i] in top else 1e9
    print(f"first difference at {i}: {gap:.4f} nats")
    return gap <= NEAR_TIE_NATS


@pytest.mark.parametrize("quantization", ["auto", "none"])
def test_greedy_with_prompt_lookup_equals_plain_decoding(smollm2_gguf, quantization):
    kw = dict(model=smollm2_gguf, dtype="float32", quantization=quantization, max_num_seqs=2)
    plain = LLM(**kw)
    spec = LLM(**kw, speculative_method="ngram", num_speculative_tokens=4)
    want = [o.outputs[0] for o in plain.generate(PROMPTS, PARAMS, use_tqdm=False)]
    got = spec.generate(PROMPTS, PARAMS, use_tqdm=False)
    for w, g in zip(want, got):
        assert first_difference_is_a_near_tie(w, g.outputs[0])
        m = g.metrics
        print(f"accepted {m['spec_accepted_tokens']} of {m['spec_draft_tokens']} drafts "
              f"({m['spec_accepted_tokens'] / max(m['spec_draft_tokens'], 1):.0%}), "
              f"{len(g.outputs[0].token_ids)} tokens")
    stats = spec.engine.get_stats()
    assert stats.spec_accepted_tokens_total > 0


def test_guided_rows_beside_speculating_rows(smollm2_gguf, smollm2_llm):
    """Structured output under prompt lookup: a JSON-schema row (which takes no drafts) batched with
    a row that speculates gives the plain engine's guided tokens, valid for its schema."""
    import json

    import jsonschema_rs

    from flashserve.sampling_params import GuidedDecodingParams

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "args": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                                        "maxItems": 2}},
              "required": ["name", "args"], "additionalProperties": False}
    guided = SamplingParams(temperature=0.0, max_tokens=64, guided_decoding=GuidedDecodingParams(json=schema))
    spec = LLM(model=smollm2_gguf, dtype="float32", kv_cache_dtype="float32", quantization="none", max_model_len=2048,
               speculative_method="ngram", num_speculative_tokens=4)
    want = smollm2_llm.generate([PROMPTS[0]], guided, use_tqdm=False)[0].outputs[0]
    got, free = spec.generate([PROMPTS[0], PROMPTS[1]], [guided, PARAMS], use_tqdm=False)
    assert got.outputs[0].token_ids == want.token_ids and got.metrics["spec_draft_tokens"] == 0
    jsonschema_rs.validate(schema, json.loads(got.outputs[0].text))
    assert free.metrics["spec_accepted_tokens"] > 0
