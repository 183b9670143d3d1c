"""Real SmolLM2-135M GGUF: our greedy continuations and logprobs against transformers on the same file.

transformers dequantizes the GGUF to float32 on its own (a separate loader, model and
tokenizer), so agreement here checks our loader, model, attention and sampler end to end.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashserve import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "List three primary colors:\n1.",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "The quick brown fox",
    "Water boils at a temperature of",
    "Translate to French: 'Good morning' ->",
    "In 1969, the first humans",
]
MAX_TOKENS = 32
TOP_N = 5
LOGPROB_TOL = 2e-3  # float32 on both sides; differences come from summation order only


@pytest.fixture(scope="module")
def hf_results(hf_smollm2, smollm2_llm):
    """Per prompt: (hf greedy tokens, hf log_softmax per generated position) on our prompt ids."""
    model, _ = hf_smollm2
    tok = smollm2_llm.get_tokenizer()
    results = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=model.config.eos_token_id)
        gen = out.sequences[0, ids.shape[1]:].tolist()
        logps = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
        results.append((gen, logps))
    return results


@pytest.fixture(scope="module")
def ours(smollm2_llm):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_N, ignore_eos=False)
    return smollm2_llm.generate(PROMPTS, params, use_tqdm=False)


def test_greedy_tokens_match_transformers(hf_results, ours):
    exact = 0
    for (hf_tokens, hf_logps), out in zip(hf_results, ours):
        our_tokens = list(out.outputs[0].token_ids)
        n = min(len(hf_tokens), len(our_tokens))
        first_diff = next((i for i in range(n) if hf_tokens[i] != our_tokens[i]), None)
        if first_diff is None and len(hf_tokens) == len(our_tokens):
            exact += 1
            continue
        # Where they part, it must be a near-tie in the reference: our token in its top-3.
        i = first_diff if first_diff is not None else n
        if i < len(our_tokens):
            top3 = torch.topk(hf_logps[i], 3).indices.tolist()
            assert our_tokens[i] in top3, f"{out.prompt!r}: token {i} {our_tokens[i]} not in HF top-3 {top3}"
    assert exact >= 9, f"only {exact}/10 greedy continuations equal transformers'"


def test_logprobs_match_transformers(hf_results, ours):
    """Top-N logprobs at every position both engines reached with the same history."""
    worst = 0.0
    for (hf_tokens, hf_logps), out in zip(hf_results, ours):
        c = out.outputs[0]
        for i, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            assert len(entry) >= TOP_N
            for token_id, lp in entry.items():
                ref = hf_logps[i][token_id].item()
                worst = max(worst, abs(lp.logprob - ref))
                assert math.isclose(lp.logprob, ref, abs_tol=LOGPROB_TOL), (out.prompt, i, token_id, lp.logprob, ref)
            if i >= len(hf_tokens) or tok != hf_tokens[i]:
                break  # histories differ from here on
    print(f"max |logprob difference| = {worst:.2e}")
