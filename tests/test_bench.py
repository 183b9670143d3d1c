"""benchmarks/bench.py end to end at --quick sizes, flashserve only (in its own worker process, two
rounds): one table per model and a PNG plot; its median/spread formatting; `flashserve bench` hands
its arguments to that script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BENCH = BENCHMARKS / "bench.py"


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_quick_bench_prints_one_table_and_saves_the_plot(smollm2_gguf, tmp_path):
    png = tmp_path / "bench.png"
    r = run(str(BENCH), "--quick", "--engines", "flashserve", "--models", smollm2_gguf, "--repeats", "2",
            "--plot", str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|")]
    assert rows == list(range(rows[0], rows[0] + len(rows))), "one table, no other table lines"
    head, _, *body = ([cell.strip() for cell in lines[i].strip("|").split("|")] for i in rows)
    assert head[0] == "measure" and head[1].startswith("flashserve") and head[1].endswith("tok/s")
    assert [cells[0] for cells in body] == [
        "prompt processing, 32 tokens", "decode, single stream (prompt 32)",
        "decode, 1 sequence (prompt 16)", "decode, 4 sequences (prompt 16)"]
    for cells in body:
        median, low, high = (float(x) for x in cells[1].replace("(", "").replace(")", "").replace("–", " ").split())
        assert 0 < low <= median <= high  # flashserve tok/s: median (min–max) of the two rounds
        assert "GFLOP/s (" in cells[2]  # its roofline, % of the measured peak
    assert "ceilings: memory read" in r.stdout and "host: " in r.stdout and "cpu: " in r.stdout
    assert "### " in r.stdout and "in its own process" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spread_and_arguments():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert bench.spread([3.0]) == "3"
    assert bench.spread([2.0, 1.0, 4.0]) == "2 (1–4)"
    a = bench.parse_args(["--quick", "--models", "a.gguf,b.gguf", "--hf-dtypes", "float32,bfloat16"])
    assert a.models == ["a.gguf", "b.gguf"] and a.hf_dtypes == ["float32", "bfloat16"] and a.concurrency == [1, 4]
    assert bench.parse_args([]).models == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]


def test_cli_bench_passes_its_arguments_to_the_script():
    r = run("-m", "flashserve.entrypoints.cli", "bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "--concurrency" in r.stdout and "--hf-max-concurrency" in r.stdout and "--models" in r.stdout
