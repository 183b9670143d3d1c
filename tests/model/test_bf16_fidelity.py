"""The bfloat16 path (what dtype='auto' picks on CPUs with AVX512-BF16) against the float32
reference on SmolLM2: greedy continuations agree up to near-ties, perplexity within 1%.
The engine runs on the packed GGUF weights with float activations (weight-only), perplexity
dequantized."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashserve import LLM, SamplingParams
from flashserve.model.loader import load_model
from tests.model.test_models_vs_hf import run_incremental

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is", "def quicksort(arr):", "Once upon a time, in a small village,",
    "The mitochondria is", "Translate to French: Good morning, how are you?", "1, 1, 2, 3, 5, 8,",
    "The best way to learn a language is", "SELECT name FROM users WHERE", "In 1969, astronauts",
    "Photosynthesis converts", "import numpy as np\n", "The weather today is",
    "A haiku about autumn:", "The main causes of the French Revolution were", "To make pancakes you need",
    "Water boils at", "The largest planet in the solar system", "Dear hiring manager,",
    "Here is a list of prime numbers:", "Machine learning is",
]


# bfloat16 compute on the packed weights with float activations: what this file isolates is the
# bfloat16 arithmetic. int8 activations (the default) are checked against the same criterion in
# tests/model/test_quant_linear.py; combined with bfloat16 they once put a 4-way near-tie's fourth
# token (0.051 below the third) first.
BF16_QUANTIZATION = "weight-only"


@pytest.fixture(scope="module")
def bf16_llm(smollm2_gguf):
    return LLM(model=smollm2_gguf, dtype="bfloat16", quantization=BF16_QUANTIZATION, max_model_len=2048)


def test_greedy_agrees_with_float32_up_to_near_ties(smollm2_llm, bf16_llm, smollm2_gguf):
    params = SamplingParams(temperature=0, max_tokens=24)
    ref = smollm2_llm.generate(PROMPTS, params, use_tqdm=False)
    ours = bf16_llm.generate(PROMPTS, params, use_tqdm=False)
    assert_near_ties(ref, ours, smollm2_gguf)


TIE = 0.05  # float32 logits this close count as tied


def assert_near_ties(ref, ours, gguf: str) -> None:
    """Where greedy outputs first differ from the float32 reference, the other choice is in the
    float32 top-3 and the logit gap is small; at least a fifth of the prompts agree to the end
    (a broken path agrees on none). With float activations half or more agree; the default int8
    rounding of activations, the arithmetic llama.cpp uses, flips near-ties sooner: 11 of 20 agreed
    when measured (4 to 6 before the zero term took the rounded x's sums, when its error was 5x
    larger)."""
    model, cfg = load_model(gguf, dtype=torch.float32)
    exact, gaps = 0, []
    for r, o in zip(ref, ours):
        a, b = list(r.outputs[0].token_ids), list(o.outputs[0].token_ids)
        if a == b:
            exact += 1
            continue
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        context = list(r.prompt_token_ids) + a[:k]
        logits = run_incremental(model, cfg, context, [len(context)])[-1]
        # In the top 3, counting a token tied with the third (within TIE) as in: one divergence
        # measured had float32 logits 12.68, 12.53, 12.48, 12.48 and took the fourth.
        third = float(logits.topk(3).values[-1])
        assert float(logits[b[k]]) >= third - TIE, f"{r.prompt!r}: token {k} not in the float32 top-3"
        gaps.append(float(logits[a[k]] - logits[b[k]]))
    print(f"{exact}/{len(ref)} identical; float32 logit gaps at the divergences {gaps}")
    assert max(gaps, default=0.0) < 1.0, f"divergences are not near-ties: float32 logit gaps {gaps}"
    assert exact >= len(ref) // 5, f"only {exact}/{len(ref)} identical"


def perplexity(path: str, dtype: torch.dtype, ids: list[int]) -> float:
    model, cfg = load_model(path, dtype=dtype)
    logits = run_incremental(model, cfg, ids, [len(ids)])
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return float(torch.exp(nll))


def test_perplexity_on_real_text_within_one_percent(smollm2_gguf, smollm2_llm):
    licence = Path("/usr/share/common-licenses/GPL-3")
    if not licence.exists():
        pytest.skip("the GPL-3 text is not on this system")
    ids = smollm2_llm.get_tokenizer().encode(licence.read_text())[:1024]
    p32 = perplexity(smollm2_gguf, torch.float32, ids)
    p16 = perplexity(smollm2_gguf, torch.bfloat16, ids)
    assert p32 < 20  # sanity: the model reads English
    print(f"perplexity over {len(ids)} tokens: float32 {p32:.4f}, bfloat16 {p16:.4f}")
    assert abs(p16 - p32) / p32 < 0.01, (p32, p16)
