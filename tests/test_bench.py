"""benchmarks/bench.py end to end at --quick sizes, flashserve only: one table and a PNG plot;
`flashserve bench` hands its arguments to that script."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_quick_bench_prints_one_table_and_saves_the_plot(smollm2_gguf, tmp_path):
    png = tmp_path / "bench.png"
    r = run(str(BENCH), "--quick", "--engines", "flashserve", "--model", smollm2_gguf, "--plot", str(png))
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
        assert float(cells[1]) > 0  # flashserve tok/s
        assert "GFLOP/s (" in cells[2]  # its roofline, % of the measured peak
    assert "ceilings: memory read" in r.stdout and "host: " in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_passes_its_arguments_to_the_script():
    r = run("-m", "flashserve.entrypoints.cli", "bench", "--help")
    assert r.returncode == 0, r.stderr
    assert "--concurrency" in r.stdout and "--hf-max-concurrency" in r.stdout
