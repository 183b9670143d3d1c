"""The real GGUF models against transformers reading the same files (dequantized, float32):
logits of a prefill and of incremental decode steps through our paged cache."""
from __future__ import annotations

import pytest
import torch

from flashserve.model.loader import load_model
from tests.model.test_models_vs_hf import run_incremental

# The dequantized weights are identical on both sides; differences are float32 summation order.
ATOL = 2e-3


def check(path: str, hf_model, tokens: list[int]) -> None:
    model, cfg = load_model(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf_model(torch.tensor([tokens])).logits[0].float()
    ours = run_incremental(model, cfg, tokens, [len(tokens) - 6] + [1] * 6)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_logits(smollm2_gguf, hf_smollm2):
    hf, tok = hf_smollm2
    text = "The paged KV cache stores keys and values in fixed-size blocks, so that memory is"
    check(smollm2_gguf, hf, tok(text)["input_ids"])


@pytest.mark.slow
def test_gemma3_logits(gemma3_gguf, hf_gemma3, hf_gemma3_tokenizer):
    """Gemma 3 270M Q4_K_M: exercises K-quants, Q5_0/Q6_K, sliding layers and the Gemma norms."""
    hf = hf_gemma3  # the session's oracle (half a minute to convert)
    tok = hf_gemma3_tokenizer
    text = "Gemma interleaves five sliding-window layers with one global layer; " * 12
    ids = tok(text)["input_ids"][:140]
    check(gemma3_gguf, hf, ids)
