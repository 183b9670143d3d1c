"""The tiny random Llama of tests/engine (SmolLM2's tokenizer for text): float32, no quantization,
so plain decoding and verification score the same positions with the same weights."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, hf_smollm2_tokenizer):
    from tests.model.tiny import hf_tiny, save_hf

    d = tmp_path_factory.mktemp("tiny_llama_spec")
    hf = hf_tiny("llama")
    save_hf(hf, d)
    hf_smollm2_tokenizer.save_pretrained(d)
    return str(d), hf
