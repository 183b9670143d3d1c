"""Real GGUF models: our greedy continuations and logprobs against transformers on the same file.

transformers dequantizes the GGUF to float32 on its own (a separate loader, model and
tokenizer), so agreement here checks our loader, model, attention and sampler end to end.
Two engines are checked: float32 with dequantized weights (SmolLM2; tight tolerances), and the
default engine (quantized kernels, int8 activations; SmolLM2, Gemma 3, Qwen2.5-Coder-0.5B), whose
arithmetic differs from transformers' on purpose, so its check is first-divergence containment.
"""
from __future__ import annotations

import math

import pytest
import torch

from flashserve import LLM, SamplingParams

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


# The default engine: quantization="auto" (GGUF codes on the project's kernels, activations rounded
# to int8 per group of 32 as llama.cpp does) and dtype="auto". Its logits differ from transformers'
# float32 ones by the int8 rounding, so greedy paths may part at a near-tie; where they part, our
# token must be one transformers also ranks near the top.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n    ",
    "import numpy as np\nx = np.arange(10)\nprint(",
]
CHAT_PROMPTS = {  # each model's own turn markup (the Gemma 3 GGUF carries no chat template)
    "smollm2_gguf": "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "gemma3_gguf": "<start_of_turn>user\nWhat is 12 times 7?<end_of_turn>\n<start_of_turn>model\n",
    "qwen05_gguf": "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
}
ORACLES = {"smollm2_gguf": "hf_smollm2", "gemma3_gguf": "hf_gemma3", "qwen05_gguf": "hf_qwen05"}
DEFAULT_TOKENS = 24
DIVERGENCE_TOP_K = 3
# Largest gap, in transformers' nats, between its top token and ours where the paths part. Int8
# activations move a token's logprob by up to 0.07 (Qwen) - 0.26 (Gemma 3) nats against
# transformers' (printed below as "max |dlogprob|"), so two tokens' order can swap across a gap of
# about twice that; the divergences seen were near-ties of 0.005-0.22 nats. A wrong model, cache or
# sampler picks tokens nats down, or outside the top 3.
MAX_GAP = 0.5


@pytest.mark.parametrize("gguf_fixture", list(ORACLES))
def test_default_engine_parts_from_transformers_only_at_near_ties(gguf_fixture, request):
    gguf = request.getfixturevalue(gguf_fixture)
    oracle = request.getfixturevalue(ORACLES[gguf_fixture])
    hf = oracle[0] if isinstance(oracle, tuple) else oracle  # hf_smollm2 also carries its tokenizer
    llm = LLM(model=gguf, max_model_len=256)  # default quantization and dtype
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in DEFAULT_PROMPTS + [CHAT_PROMPTS[gguf_fixture]]]
    params = SamplingParams(temperature=0.0, max_tokens=DEFAULT_TOKENS, logprobs=1)
    outs = llm.generate(prompts, params, use_tqdm=False)
    exact, worst_gap, worst_drift = 0, 0.0, 0.0
    for ids, out in zip(prompts, outs):
        ours = list(out.outputs[0].token_ids)
        with torch.no_grad():  # transformers on our prefix: row i scores our token i
            ref = torch.log_softmax(hf(torch.tensor([ids + ours])).logits[0, len(ids) - 1:-1].double(), -1)
        for i, tok_id in enumerate(ours):
            ref_top = ref[i].topk(DIVERGENCE_TOP_K)
            if tok_id == ref_top.indices[0].item():
                worst_drift = max(worst_drift, abs(out.outputs[0].logprobs[i][tok_id].logprob - ref[i, tok_id].item()))
                continue
            gap = (ref_top.values[0] - ref[i, tok_id]).item()
            worst_gap = max(worst_gap, gap)
            where = f"{gguf_fixture} prompt {tok.decode(ids)!r}, token {i} ({tok.decode(ours[:i + 1])!r})"
            assert tok_id in ref_top.indices.tolist(), f"{where}: {tok_id} not in transformers' top-{DIVERGENCE_TOP_K}"
            assert gap <= MAX_GAP, f"{where}: {gap:.3f} nats below transformers' top token"
            break  # the histories differ from here on
        else:
            exact += 1
    print(f"\n{gguf_fixture}: {exact}/{len(prompts)} greedy continuations equal transformers'; "
          f"largest gap at a divergence {worst_gap:.3f} nats; max |dlogprob| before it {worst_drift:.3f}")
