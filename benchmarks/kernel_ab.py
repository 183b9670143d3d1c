"""A/B of the quantized matmul kernel between two builds of the C++ sources: this checkout's and
those of a git revision (built under another extension name), or this checkout's at another
instruction-set level (--baseline-level avx2), in one process, calls alternated
A B A B per cell, weights cycled beyond the L3 cache as a model's layers are. Also checks that both
builds give bit-identical outputs (the kernels' integer arithmetic must not depend on the build).

    python benchmarks/kernel_ab.py [--baseline HEAD | --baseline-level LEVEL] [--level LEVEL] [--model smollm2-135m]
        [--ms 1,8,32,128] [--repeats 7] [--q4k]

Prints µs per call, median (min-max) of the repeats, and the ratio new / baseline per cell.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from common import header, set_threads, table
from flashserve.kernels.build import CSRC, SOURCES, build_cpu_kernels, engine_level
from flashserve.quantization.group_quant_weight import factored_table, table_values

L3_BYTES = 64 << 20
SHAPES = {  # (name, N, K, bits) of one layer; the LM head as the tied embedding's 8-bit codes
    "smollm2-135m": [("qkv", 960, 576, 4), ("o", 576, 576, 4), ("gate_up", 3072, 576, 4), ("down", 576, 1536, 4),
                     ("head", 49152, 576, 8)],
    # Q4_K_M: q, k Q5_0 beside a Q8_0 v (8-bit), o and gate/up Q5_0 (5-bit), down Q6_K (8-bit requantized)
    # Q4_K_M: most matrices Q4_K (4-bit), some down projections and the tied head Q6_K (8-bit requantized)
    "qwen2.5-coder-1.5b": [("o", 1536, 1536, 4), ("gate_up", 17920, 1536, 4), ("down", 1536, 8960, 4),
                           ("down", 1536, 8960, 8), ("head", 151936, 1536, 8)],
    # Q4_K_M: rows of 640 are no whole K-quant blocks, so q, k, gate and up are Q5_0 (5-bit), v Q8_0 and
    # down Q6_K (8-bit), o Q4_K (4-bit); the tied head Q8_0
    "gemma3-270m": [("qk", 1280, 640, 5), ("v", 256, 640, 8), ("o", 640, 1024, 4), ("gate_up", 4096, 640, 5),
                    ("down", 640, 2048, 8), ("head", 262144, 640, 8)],
    "qwen2.5-coder-0.5b": [("qkv", 1152, 896, 8), ("o", 896, 896, 5), ("gate_up", 9728, 896, 5),
                           ("down", 896, 4864, 8), ("head", 151936, 896, 8)],
}


def baseline_build(rev: str, workdir: Path, level: str | None):
    src = workdir / "csrc"
    src.mkdir()
    for name in [*SOURCES, *(h.name for h in CSRC.glob("*.h"))]:
        (src / name).write_text(_show(rev, name))
    tag = rev.replace("/", "_").replace("~", "_").replace("^", "_")
    return build_cpu_kernels(level, src, name=f"flashserve_kernel_ab_{tag}_{level or 'engine'}")


def _show(rev: str, name: str) -> str:
    """A source file as of `rev`, from where the kernels lived then (flashserve/attention/csrc before
    the kernels package)."""
    for folder in ("flashserve/kernels/csrc", "flashserve/attention/csrc"):
        try:
            return subprocess.check_output(["git", "show", f"{rev}:{folder}/{name}"], cwd=CSRC, text=True,
                                           stderr=subprocess.DEVNULL)
        except subprocess.CalledProcessError:
            continue
    raise FileNotFoundError(f"{name} at {rev}")


def weights(n: int, k: int, bits: int, gen: torch.Generator, table: torch.dtype, q4k: bool) -> list[tuple]:
    """Copies of one layer's weights filling L3 twice, each (codes, scale, zero) for the new build and
    (scale, zero) for the baseline; scales and zeros of dtype `table` (float16 as GGUF's legacy types
    keep them; float32 for a baseline revision that predates float16 tables). q4k: 4-bit weights as
    the engine holds Q4_K, factored tables for the new build, their float32 values for the baseline."""
    code_bytes = {4: k // 2, 5: k // 32 * 20, 8: k}[bits]
    per = n * code_bytes + 2 * n * (k // 32) * table.itemsize
    out = []
    for _ in range(max(1, -(-2 * L3_BYTES // per))):
        if bits == 8:
            codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).view(torch.uint8)
        else:  # any bytes are valid 4- and 5-bit codes
            codes = torch.randint(0, 256, (n, code_bytes), dtype=torch.uint8, generator=gen)
        if q4k and bits == 4:
            scale, zero = (factored_table(torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=gen),
                                          (torch.rand(n, k // 256, generator=gen) * 1e-3).half()) for _ in range(2))
            out.append((codes, scale, zero, table_values(scale), table_values(zero)))
            continue
        zero = (torch.randn(n, k // 32, generator=gen) * 0.01).to(table) if bits == 4 else None
        scale = (torch.rand(n, k // 32, generator=gen) * 0.01).to(table)
        out.append((codes, scale, zero, scale, zero))
    return out


def time_calls(kernels, x, ws, bits: int, baseline: bool) -> float:
    """µs per call over one pass through the weight copies."""
    t0 = time.perf_counter()
    for codes, scale, zero, old_scale, old_zero in ws:
        if baseline:
            kernels.group_quant_matmul(x, codes, old_scale, old_zero, bits, 32, True)
        else:
            kernels.group_quant_matmul(x, codes, scale, zero, bits, 32, True)
    return (time.perf_counter() - t0) / len(ws) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="HEAD", help="git revision whose C++ sources are the baseline")
    ap.add_argument("--baseline-level", default=None,
                    help="instead: this checkout's sources built at this instruction-set level (e.g. avx2)")
    ap.add_argument("--level", default=None,
                    help="both builds at this instruction-set level (default: the engine's; e.g. avx2 on a wider CPU)")
    ap.add_argument("--model", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--ms", default="1,8,32,128", help="activation rows per call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--q4k", action="store_true",
                    help="4-bit weights with Q4_K's factored tables in this checkout, float32 ones in the baseline")
    a = ap.parse_args()
    set_threads(a.threads)
    new = build_cpu_kernels(a.level)
    if a.baseline_level:
        old, a.baseline = build_cpu_kernels(a.baseline_level), f"level {a.baseline_level}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            old = baseline_build(a.baseline, Path(tmp), a.level)
    header(f"quantized matmul, this checkout ({a.level or engine_level().level.name}) against {a.baseline}", model=a.model,
           threads=a.threads, activations="int8 per group of 32 (the default engine's)",
           tables="Q4_K factored (new) vs float32 (baseline)" if a.q4k else "as the baseline takes them")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, n, k, bits in SHAPES[a.model]:
        ws = weights(n, k, bits, gen, torch.float16 if a.baseline_level else torch.float32, a.q4k)
        for m in (int(v) for v in a.ms.split(",")):
            x = torch.randn(m, k, generator=gen)
            codes, scale, zero, old_scale, old_zero = ws[0]
            same = torch.equal(new.group_quant_matmul(x, codes, scale, zero, bits, 32, True),
                               old.group_quant_matmul(x, codes, old_scale, old_zero, bits, 32, True))
            t = {"new": [], "old": []}
            time_calls(new, x, ws, bits, False), time_calls(old, x, ws, bits, True)  # warm-up
            for _ in range(a.repeats):
                t["new"].append(time_calls(new, x, ws, bits, False))
                t["old"].append(time_calls(old, x, ws, bits, True))
            med = {key: statistics.median(v) for key, v in t.items()}
            rows.append({"layer": f"{name} {n}x{k} ({bits}-bit)", "M": m,
                         f"{a.baseline} µs": f"{med['old']:.1f} ({min(t['old']):.1f}-{max(t['old']):.1f})",
                         "new µs": f"{med['new']:.1f} ({min(t['new']):.1f}-{max(t['new']):.1f})",
                         "new / old": med["new"] / med["old"], "bit-identical": "yes" if same else "NO"})
            print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
