"""The command line for real: generate streams a completion, chat answers over stdin."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "flashserve.entrypoints.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_the_greedy_completion(smollm2_gguf, smollm2_llm):
    from flashserve import SamplingParams

    want = smollm2_llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12),
                                use_tqdm=False)[0].outputs[0].text
    r = run("generate", "--model", smollm2_gguf, "--dtype", "float32", "--quantization", "none",
            "--prompt", "The capital of France is",
            "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want


def test_chat_answers_each_line(smollm2_gguf):
    # weight-only: with int8 activations this question's first token is a near-tie ("La" -1.84,
    # "The" -1.86 nats), and int8 rounding turns last-bit differences into different answers.
    r = run("chat", "--model", smollm2_gguf, "--dtype", "float32", "--quantization", "weight-only",
            "--max-tokens", "16", stdin="What is the capital of France?\n\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_env_names_this_cpu_features_and_the_chosen_dtype(smollm2_gguf):
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).partition(":")[2].split())
    r = run("env", "--model", smollm2_gguf)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    listed = set(lines["features"].split())
    assert listed <= flags and {"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & flags <= listed
    assert lines["native bfloat16"] == ("yes" if {"avx512_bf16", "amx_bf16"} & flags else "no")
    assert lines["C++ kernels"].startswith("built for this CPU")
    # A Q4_1 file runs on the quantized kernels, whose float side is float32, on every CPU.
    assert lines[f"dtype for {smollm2_gguf}"].startswith("float32")
