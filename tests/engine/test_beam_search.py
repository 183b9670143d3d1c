"""Beam search against transformers' generate(num_beams=..., length_penalty=..., early_stopping=...)
on SmolLM2 (float32, the same dequantized weights): same sequences, same scores."""
from __future__ import annotations

import pytest
import torch

from flashserve.engine.beam_search import BeamSearchParams

pytestmark = pytest.mark.slow

CASES = [
    ("What is 2+2?", 4, 1.0, True, 16),
    ("Name a color.", 3, 0.6, False, 12),
    ("Write one word that rhymes with cat.", 4, 1.5, True, 24),
    ("Give me a short greeting.", 2, 1.0, "never", 20),
]


@pytest.mark.parametrize("question,k,lp,early,max_tokens", CASES)
def test_beam_search_equals_transformers(smollm2_llm, hf_smollm2, question, k, lp, early, max_tokens):
    hf, hf_tok = hf_smollm2
    tok = smollm2_llm.get_tokenizer()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]), add_special_tokens=False)
    (ours,) = smollm2_llm.beam_search([prompt], BeamSearchParams(k, max_tokens, lp, early))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k, length_penalty=lp,
                          early_stopping=early, max_new_tokens=max_tokens, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, eos_token_id=2, pad_token_id=2)
    assert len(ours.sequences) == k
    for i in range(k):  # every returned beam, best first, with its length-penalised score
        ref_tokens = ref.sequences[i, len(prompt):].tolist()
        while ref_tokens and ref_tokens[-1] == 2 and ref_tokens.count(2) > 1:  # padding after EOS
            ref_tokens.pop()
        assert ours.sequences[i].tokens == ref_tokens, i
        assert abs(ours.sequences[i].score - ref.sequences_scores[i].item()) < 1e-3, i
