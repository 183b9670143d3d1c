"""A tiny random Llama served by the whole engine (with SmolLM2's tokenizer for detokenizing),
next to the transformers model it was saved from: exact oracles in milliseconds per step."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, hf_smollm2_tokenizer):
    from tests.model.tiny import hf_tiny, save_hf

    d = tmp_path_factory.mktemp("tiny_llama")
    hf = hf_tiny("llama")
    save_hf(hf, d)
    hf_smollm2_tokenizer.save_pretrained(d)
    return str(d), hf
