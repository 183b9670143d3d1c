"""benchmarks/load_test.py end to end against flashserve's server only (aiperf as the client, one
request in flight, 4 requests of 16 tokens), then its summary and ratio arithmetic on that real run.
llama-server is not needed: the peer is left out with --engines. Skips without the aiperf venv
(`make loadtest-tools`), except under CI=true, where `make test` installs it and a skip is a failure."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "load_test.py"
AIPERF = ROOT / ".venv-loadtest" / "bin" / "aiperf"


def load_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import load_test
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return load_test


@pytest.mark.slow
def test_one_real_run_against_our_server(smollm2_gguf, tmp_path):
    if not AIPERF.exists():
        why = f"{AIPERF} missing (make loadtest-tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(why + "; CI=true, so this is a failure, not a skip")
        pytest.skip(why)
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", smollm2_gguf, "--engines", "flashserve",
                        "--concurrency", "1", "--repeats", "1", "--rounds", "1", "--min-requests", "4",
                        "--output-tokens", "16", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "cpu: " in r.stdout and "client: aiperf 0.13.0" in r.stdout
    md = (tmp_path / "load_test.md").read_text()
    assert f"report: {tmp_path / 'load_test.md'}" in r.stdout
    assert (tmp_path / "load_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    runs = json.loads((tmp_path / "raw" / "runs.json").read_text())
    assert len(runs) == 1
    run = runs[0]
    assert (run["engine"], run["mode"], run["concurrency"], run["requests"], run["errors"]) == ("flashserve", "plain", 1, 4, 0)
    assert run["out_tokens_per_request"] == 16  # ignore_eos: every request runs to max_tokens
    assert run["tok_s"] > 0 and 0 < run["ttft_p50_ms"] <= run["ttft_p99_ms"] and 0 < run["itl_p50_ms"] <= run["itl_p99_ms"]
    # The table's cells are the run's own figures (one repeat: the value alone)
    lt = load_module()
    row = next(line for line in md.splitlines() if line.startswith("| flashserve | plain | 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == lt.spread([run["tok_s"]]) and cells[8] == "4" and cells[9] == "0" and cells[10] == "16"

    # Ratios are taken within a repeat: this run against itself is 1 on every metric, and a second
    # repeat whose peer ran at half the rate gives the median of 1 and 2
    peer = [{**run, "engine": "llama-server"}, {**run, "engine": "llama-server", "repeat": 1, "tok_s": run["tok_s"] / 2}]
    rows, ratios = lt.summarize([run, {**run, "repeat": 1}, *peer])
    assert [(x["engine"], x["repeats"]) for x in rows] == [("flashserve", 2), ("llama-server", 2)]
    assert ratios[0]["pairs"] == 2 and ratios[0]["tok_s"] == "1.5 (1–2)" and ratios[0]["ttft_p50_ms"] == "1 (1–1)"


def test_arguments_and_spread():
    lt = load_module()
    a = lt.parse_args([])
    assert a.concurrency == [1, 4, 16, 32, 64] and a.modes == ["plain"] and a.engines == ["flashserve", "llama-server"]
    a = lt.parse_args(["--json-schema"])
    assert a.concurrency == [1, 32] and a.modes == ["plain", "json_schema"]
    assert lt.spread([3.0]) == "3" and lt.spread([2.0, 1.0, 4.0]) == "2 (1–4)"
    # each server gets the same schema in the field it reads on /v1/completions
    ours, peer = lt.extra_inputs("flashserve", "json_schema"), lt.extra_inputs("llama-server", "json_schema")
    assert ours["response_format"]["json_schema"]["schema"] == peer["json_schema"] == lt.SCHEMA
    assert "ignore_eos" not in ours and "ignore_eos" not in peer  # flashserve refuses it with a schema
    assert lt.extra_inputs("llama-server", "plain") == {"temperature": 0.0, "ignore_eos": True}
