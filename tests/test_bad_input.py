"""Bad input gets one clear error naming the problem: through the API (exception type and
message) and through the CLI (one line on stderr, exit code 2, no traceback)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from flashserve.engine.arg_utils import EngineArgs
from flashserve.errors import InvalidRequestError, ModelFormatError, ModelNotFoundError


def config_error(model: str):
    with pytest.raises((ModelFormatError, ModelNotFoundError)) as err:
        EngineArgs(model=model).create_engine_config()
    return str(err.value)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashserve.entrypoints.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_missing_path(tmp_path):
    msg = config_error(str(tmp_path / "nope.gguf"))
    assert "not found" in msg and "nope.gguf" in msg


def test_hub_id_is_refused_with_a_hint():
    msg = config_error("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "hub" in msg and ".gguf" in msg


def test_unknown_name_lists_the_catalogue():
    msg = config_error("no-such-model")
    assert "smollm2-135m" in msg


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a GGUF file" in config_error(str(p))


def test_truncated_gguf(tmp_path, smollm2_gguf):
    p = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        p.write_bytes(f.read(5_000_000))
    assert "truncated" in config_error(str(p))


def test_corrupted_header(tmp_path, smollm2_gguf):
    with open(smollm2_gguf, "rb") as f:
        data = bytearray(f.read(200_000))
    data[8:24] = b"\xff" * 16  # tensor and metadata counts become absurd
    p = tmp_path / "bad.gguf"
    p.write_bytes(bytes(data))
    assert "GGUF" in config_error(str(p))


def test_unsupported_architecture(tmp_path):
    import gguf

    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_uint32("mamba.block_count", 1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = config_error(str(p))
    assert "unsupported model architecture" in msg and "mamba" in msg


def test_cli_reports_one_line_without_traceback(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "missing.gguf"), "--prompt", "hi")
    assert r.returncode == 2
    assert r.stderr.startswith("flashserve: error:") and "not found" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_prompt_longer_than_context_is_refused_and_the_engine_keeps_serving(smollm2_llm):
    from flashserve import SamplingParams

    llm = smollm2_llm
    limit = llm.engine.config.scheduler.max_model_len
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate([[5] * (limit + 10)], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert not llm.engine.has_unfinished_requests()
