"""Shared fixtures: real catalogue models (fetched once into the flashserve cache) and torch threads."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("smollm2-135m"))


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("gemma3-270m"))


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """Transformers' own reading of the same GGUF (dequantized, float32): the oracle."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    """Our engine on the same file, float32 and dequantized like transformers' reading (session-wide:
    loading costs seconds)."""
    from flashserve import LLM

    return LLM(model=smollm2_gguf, dtype="float32", quantization="none", max_model_len=2048)
