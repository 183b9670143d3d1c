"""A tiny random Llama served by the whole engine (with SmolLM2's tokenizer for detokenizing),
next to the transformers model it was saved from: exact oracles in milliseconds per step."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_gguf):
    from transformers import AutoTokenizer

    from tests.model.tiny import hf_tiny, save_hf

    d = tmp_path_factory.mktemp("tiny_llama")
    hf = hf_tiny("llama")
    save_hf(hf, d)
    gguf = Path(smollm2_gguf)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(d)
    return str(d), hf
