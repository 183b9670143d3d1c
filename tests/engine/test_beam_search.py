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


# Beam search under a grammar against transformers' constrained beam search: generate() with
# prefix_allowed_tokens_fn, the allowed tokens from an llguidance matcher built here on
# transformers' own tokenizer (flashserve builds its own from the GGUF's vocabulary).
GUIDED_CASES = [
    ("Name a color.", 3, 1.0, False, 14, r"(Red|Blue|Green|Yellow|Purple)( is a (bright|calm|warm|deep) colou?r)?\."),
    ("What is 2+2?", 4, 0.8, "never", 10, r"The answer is [0-9]{1,3}\.( Yes| Indeed)?"),
]


@pytest.mark.parametrize("question,k,lp,early,max_tokens,regex", GUIDED_CASES)
def test_beam_search_under_a_grammar_equals_transformers(smollm2_llm, hf_smollm2, question, k, lp, early, max_tokens,
                                                         regex):
    import re

    import llguidance
    import llguidance.hf
    import llguidance.torch

    from flashserve import SamplingParams
    from flashserve.sampling_params import GuidedDecodingParams

    hf, hf_tok = hf_smollm2
    tok = smollm2_llm.get_tokenizer()
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]), add_special_tokens=False)
    gd = GuidedDecodingParams(regex=regex)
    (ours,) = smollm2_llm.beam_search([prompt], BeamSearchParams(k, max_tokens, lp, early, gd))
    template = llguidance.LLMatcher(llguidance.hf.from_tokenizer(hf_tok), llguidance.LLMatcher.grammar_from_regex(regex))
    mask = llguidance.torch.allocate_token_bitmask(1, hf.config.vocab_size)

    def allowed(batch_id, input_ids) -> list[int]:
        m = template.deep_copy()
        assert m.consume_tokens(input_ids[len(prompt):].tolist())
        llguidance.torch.fill_next_token_bitmask(m, mask)
        bits = ((mask[0].view(-1, 1) >> torch.arange(32)) & 1).flatten()[:hf.config.vocab_size]
        return bits.nonzero().flatten().tolist()

    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k, length_penalty=lp,
                          early_stopping=early, max_new_tokens=max_tokens, do_sample=False,
                          prefix_allowed_tokens_fn=allowed, output_scores=True, return_dict_in_generate=True,
                          eos_token_id=2, pad_token_id=2)
    assert len(ours.sequences) == k
    for i in range(k):
        ref_tokens = ref.sequences[i, len(prompt):].tolist()
        while ref_tokens and ref_tokens[-1] == 2 and ref_tokens.count(2) > 1:
            ref_tokens.pop()
        assert ours.sequences[i].tokens == ref_tokens, (i, tok.decode(ours.sequences[i].tokens), tok.decode(ref_tokens))
        assert abs(ours.sequences[i].score - ref.sequences_scores[i].item()) < 1e-3, i
        text = tok.decode([t for t in ours.sequences[i].tokens if t != 2])
        assert re.fullmatch(regex, text) or ours.sequences[i].tokens[-1] != 2, text  # complete when it ended
    # the same search through LLM.generate's use_beam_search
    (out,) = smollm2_llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
        use_beam_search=True, n=k, temperature=0, max_tokens=max_tokens, length_penalty=lp, early_stopping=early,
        guided_decoding=gd), use_tqdm=False)
    assert [list(c.token_ids) for c in out.outputs] == [s.tokens for s in ours.sequences]
