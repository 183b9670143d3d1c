"""Shared fixtures: the C++ kernels (built strictly), real catalogue models (fetched once into the
flashserve cache) and torch threads."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

# Test files that start a local Ray cluster: run one after the other in one worker under pytest-xdist.
_RAY_FILES = {"test_ray.py", "test_parallel_real_models.py"}


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (make test) each test file is one unit of work, so its
    module-scoped models load once, in one worker; the files that start Ray share one unit."""
    for item in items:
        group = "ray" if item.path.name in _RAY_FILES else str(item.path)
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def cpp_kernels():
    """The project's C++ kernels, built strictly: when they do not build, the tests that ask for
    them fail with the compiler's output instead of skipping (the engine would fall back quietly)."""
    from flashserve.kernels.build import build_cpu_kernels, cpu_kernels

    kernels = build_cpu_kernels()
    assert cpu_kernels() is kernels  # the engine's layers call this same build
    return kernels


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("smollm2-135m"))


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("gemma3-270m"))


@pytest.fixture(scope="session")
def qwen05_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("qwen2.5-coder-0.5b"))


@pytest.fixture(scope="session")
def qwen15_gguf() -> str:
    from flashserve.model.catalogue import fetch

    return str(fetch("qwen2.5-coder-1.5b"))


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_gguf):
    """Transformers' tokenizer for the SmolLM2 GGUF (seconds to build: shared by the session)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(smollm2_gguf)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf, hf_smollm2_tokenizer):
    """Transformers' own reading of the same GGUF (dequantized, float32): the oracle."""
    return _hf_oracle(smollm2_gguf), hf_smollm2_tokenizer


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_gguf):
    """Our engine on the same file, float32 and dequantized like transformers' reading (session-wide:
    loading costs seconds)."""
    from flashserve import LLM

    return LLM(model=smollm2_gguf, dtype="float32", kv_cache_dtype="float32", quantization="none", max_model_len=2048)


@pytest.fixture(scope="session")
def smollm2_default_llm(smollm2_gguf):
    """Our default engine (quantization and dtype "auto") on SmolLM2: the offline twin the server
    and CLI tests take their expected outputs from. No prefix caching: every prompt is computed
    whole, as a server or CLI computes it the first time (with int8 activations a prefix-cache
    hit can flip a near-tie; tests/engine/test_batching.py)."""
    from flashserve import LLM

    return LLM(model=smollm2_gguf, max_model_len=1024, enable_prefix_caching=False)


@pytest.fixture(scope="session")
def hf_gemma3_tokenizer(gemma3_gguf):
    """Transformers' tokenizer for the Gemma 3 GGUF (half a minute to build: shared by the session)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(gemma3_gguf)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _hf_oracle(gguf: str):
    """Transformers' own reading of a GGUF file (dequantized, float32). gguf-py parses a vocabulary
    value by value, twice (config, then weights): over a minute for Gemma 3's and Qwen's on two
    cores. So the first session on a machine saves what transformers read with its own
    save_pretrained, keyed by the file and transformers' version, and later ones load that."""
    import json
    import os
    import shutil
    from pathlib import Path

    import safetensors.torch
    import transformers
    from transformers import AutoModelForCausalLM

    from flashserve.model.catalogue import cache_dir

    path = Path(gguf)
    st = path.stat()
    saved = cache_dir() / "hf-oracles" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-transformers-{transformers.__version__}"
    if saved.is_dir():
        return AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # save_pretrained refuses a model read from GGUF: its tensors and its config (less the GGUF marker),
    # which from_pretrained reads back as a plain float32 checkpoint
    tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config))
    model.generation_config.save_pretrained(tmp)
    try:
        tmp.rename(saved)  # whole or not at all
    except OSError:  # another session got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return model


@pytest.fixture(scope="session")
def hf_gemma3(gemma3_gguf):
    """The oracle for Gemma 3 270M: the model only (ids go in, so its tokenizer is not built)."""
    return _hf_oracle(gemma3_gguf)


@pytest.fixture(scope="session")
def hf_qwen05(qwen05_gguf):
    """The oracle for Qwen2.5-Coder-0.5B: the model only (about a minute to convert, ~2 GB float32)."""
    return _hf_oracle(qwen05_gguf)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, hf_smollm2_tokenizer):
    """A tiny random Llama served by the whole engine (with SmolLM2's tokenizer for detokenizing), next
    to the transformers model it was saved from: float32, exact oracles in milliseconds per step."""
    from tests.model.tiny import hf_tiny, save_hf

    d = tmp_path_factory.mktemp("tiny_llama")
    hf = hf_tiny("llama")
    save_hf(hf, d)
    hf_smollm2_tokenizer.save_pretrained(d)
    return str(d), hf
