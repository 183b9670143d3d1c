"""Start fast, stay small: the one-shot commands reserve the KV cache they can use, a reserved
pool costs no memory until it is written, and a one-shot generate imports neither the server
stack nor transformers once the tokenizer is cached."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashserve.entrypoints.cli import build_parser
from flashserve.entrypoints.cli_flags import engine_args_from
from flashserve.entrypoints.cli_run import one_shot_engine

PROMPT = "The capital of France is"
BLOCK = 16  # the engine's default block size


def test_one_shot_generate_reserves_only_what_its_request_can_use(smollm2_gguf, hf_smollm2_tokenizer):
    a = build_parser().parse_args(["generate", "--model", smollm2_gguf, "--prompt", PROMPT, "--max-tokens", "40"])
    engine, params = one_shot_engine(a)
    n = len(hf_smollm2_tokenizer(PROMPT)["input_ids"])  # an independent count of the prompt's tokens
    # prompt + max_tokens rounded up to blocks, plus block 0 (padding, never handed out)
    assert engine.num_blocks == -(-(n + 40) // BLOCK) + 1
    stats = engine.get_stats()
    allocated = sum(k.nbytes + v.nbytes for k, v in engine.runner.kv_caches)
    assert stats.kv_cache_bytes_reserved == allocated
    assert stats.kv_cache_bytes_touched == 0

    rid = engine.next_request_id()
    engine.add_request(rid, PROMPT, params)
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    k = len(out.outputs[0].token_ids)
    stats = engine.get_stats()
    written = n + k - 1  # the last sampled token's K/V is never computed
    assert stats.kv_blocks_touched == -(-written // BLOCK)
    assert stats.kv_cache_bytes_touched == stats.kv_blocks_touched * allocated // engine.num_blocks


def test_chat_runs_one_sequence_and_serve_keeps_its_batch():
    parser = build_parser()
    assert engine_args_from(parser.parse_args(["chat"])).max_num_seqs == 1
    assert engine_args_from(parser.parse_args(["generate", "--prompt", "x"])).max_num_seqs == 1
    assert engine_args_from(parser.parse_args(["serve"])).max_num_seqs == 64


def run_python(code: str, env_cache, *args: str) -> dict:
    import os

    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FLASHSERVE_CACHE": str(env_cache)})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reserved_kv_pool_is_not_resident(smollm2_gguf, tmp_path):
    """The same short request in two processes, one reserving 64 MiB of KV cache and one 4 GiB:
    their peak RSS differs by far less than the reservations do (a zero-filled pool made all of
    it resident)."""
    code = """
import json, resource, sys
from flashserve import LLM, SamplingParams
llm = LLM(model=sys.argv[1], kv_cache_memory=int(sys.argv[2]))
llm.generate([sys.argv[3]], SamplingParams(max_tokens=8), use_tqdm=False)
s = llm.engine.get_stats()
print(json.dumps({"reserved": s.kv_cache_bytes_reserved, "touched": s.kv_cache_bytes_touched,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
    small, large = (run_python(code, tmp_path, smollm2_gguf, str(size), PROMPT) for size in (64 << 20, 4 << 30))
    assert large["reserved"] > 3.9 * 2**30 and small["reserved"] < 64 << 20
    assert large["touched"] == small["touched"] > 0
    assert large["peak_rss"] - small["peak_rss"] < 128 << 20, (small, large)


def test_one_shot_generate_imports_neither_server_nor_transformers(smollm2_gguf, tmp_path):
    code = f"""
import contextlib, io, json, sys
from flashserve.entrypoints.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    rc = main(["generate", "--model", {smollm2_gguf!r}, "--prompt", {PROMPT!r}, "--max-tokens", "2"])
print(json.dumps({{"rc": rc, "loaded": sorted(m for m in ("transformers", "fastapi", "uvicorn", "jinja2")
                                          if m in sys.modules)}}))
"""
    first = run_python(code, tmp_path)  # builds the tokenizer (transformers) and caches it
    assert first["rc"] == 0 and "transformers" in first["loaded"]
    assert run_python(code, tmp_path) == {"rc": 0, "loaded": []}


PACKING_PHASES = ["C++ kernels loaded", "model built (modules, rotary tables)", "weights read and packed",
                  "weights mapped in huge pages"]


@pytest.mark.parametrize("weights", ["packed", "mapped from the weight cache"])
def test_a_generate_marks_its_start_phases_in_order_and_prints_all_it_generated(smollm2_gguf, tmp_path, weights):
    """FLASHSERVE_STARTUP_PHASES (what `flashserve bench --startup` breaks a start down with): every
    phase of a one-shot start marked once, in order, times and memory growing, whether it packs the
    model file or maps the packed weights a start saved before; and the `flashserve` command's quick
    exit (no interpreter teardown) still prints the whole completion, as the engine streamed it, with
    the exit status."""
    from flashserve import LLM, SamplingParams, startup_phases

    # the same completion in this process, through the API (which also leaves the weight cache's entry)
    llm = LLM(model=smollm2_gguf, max_model_len=64, max_num_seqs=1)
    want = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)[0].outputs[0].text

    marks = tmp_path / "phases.jsonl"
    cmd = [sys.executable, "-m", "flashserve.entrypoints.cli", "generate", "--model", smollm2_gguf, "--prompt", PROMPT,
           "--max-tokens", "6", "--temperature", "0", *(["--no-weight-cache"] if weights == "packed" else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, startup_phases.ENV: str(marks)})
    assert out.returncode == 0, out.stderr[-2000:]
    phases = startup_phases.read(str(marks))
    assert [p["phase"] for p in phases] == [
        "interpreter and CLI imports", "tokenizer (GGUF header check, cached vocabulary)", "torch and engine imports",
        "engine config (GGUF metadata)",
        *(PACKING_PHASES if weights == "packed" else ["weights mapped from the weight cache"]), "KV cache reserved",
        "engine ready (scheduler, sampler, collector frozen)",
        "first token (prompt's prefill)", "the other tokens"]
    assert all(a["t"] <= b["t"] for a, b in zip(phases, phases[1:]))
    assert all(0 < p["rss_mib"] <= p["peak_mib"] for p in phases)
    assert phases[-1]["peak_mib"] > phases[0]["peak_mib"] + 100  # torch and the weights came in between
    assert out.stdout == want + "\n"
