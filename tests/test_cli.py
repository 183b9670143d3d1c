"""The command line for real: generate streams a completion, chat answers over stdin."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.host import cpu_flags

pytestmark = pytest.mark.slow


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "flashserve.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_completion(smollm2_gguf, smollm2_default_llm):
    """The default engine on the command line prints what it gives offline through LLM.generate."""
    from flashserve import SamplingParams

    want = smollm2_default_llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12),
                                        use_tqdm=False)[0].outputs[0].text
    r = run("generate", "--model", smollm2_gguf, "--prompt", "The capital of France is", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want


def test_chat_answers_each_line(smollm2_gguf, smollm2_default_llm):
    """Each line is a user turn answered through the chat template, as LLM.chat answers it. (Not
    checked for "Paris": the first token is a close call among "L", "The" and "La", -1.92, -2.27
    and -2.34 nats in the default engine, which answers "L'Étoile, la Marseillaise, ...".)"""
    from flashserve import SamplingParams

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    want = smollm2_default_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    r = run("chat", "--model", smollm2_gguf, "--max-tokens", "16", stdin="What is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"> {want.outputs[0].text}\n> "


def test_env_names_this_cpu_features_and_the_chosen_dtype(smollm2_gguf):
    flags = cpu_flags()
    r = run("env", "--model", smollm2_gguf)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    listed = set(lines["features"].split())
    assert listed <= flags and {"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & flags <= listed
    assert lines["native bfloat16"] == ("yes" if {"avx512_bf16", "amx_bf16"} & flags else "no")
    # the level: the widest whose features the CPU lists (kernels/build.py LEVELS), read independently here
    want = ("avx512_vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"} <= flags
            else "avx_vnni" if {"avx_vnni", "avx2", "fma", "f16c"} <= flags
            else "avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar")
    assert lines["C++ kernels"].startswith(f"level {want},"), lines["C++ kernels"]
    # A Q4_1 file runs on the quantized kernels, whose float side is float32, on every CPU.
    assert lines[f"dtype for {smollm2_gguf}"].startswith("float32")
    # the system's THP setting, read here from sysfs: the word in brackets
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text().split("[")[1].split("]")[0] if thp.exists() else "unknown"
    assert lines["huge pages"].endswith(f"(transparent_hugepage: {mode})")
