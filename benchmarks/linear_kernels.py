"""Linear layers of a model's shapes on the CPU kernels flashserve can use, and the engine's
single-stream decode with and without quantized execution.

    python benchmarks/linear_kernels.py [--model smollm2-135m] [--threads 1] [--ms 1,4,16,64,256] [--engine]

Per shape and batch size M (µs per call, x and y in float32 as the engine's compute dtype):
  fp32, bf16      F.linear on a dense weight (bf16: x and weight in bfloat16)
  int4            Int4Weight's kernel (_weight_int4pack_mm_for_cpu, groups of 32), conversions included
  int8            Int8Weight's kernel (_weight_int8pack_mm, per-row scales)
  int4 dq, int8 dq  the large-M path: dequantize to float32 in row chunks, then torch.mm
  int8 grp        Int8GroupWeight (the tied embedding / LM head): one int8 call per group of 32
  own4, own8      GroupQuantWeight: this project's C++ kernel, 4-bit (groups of 32, scale + zero) and
                  8-bit (groups of 32, scale) codes, float32 x and y
  own4 dq         GroupQuantWeight's large-M path: dequantize to float32 in row chunks, then torch.mm
  own4 q8, own8 q8  the same weights with int8_activations: x rounded per 32 values to int8, integer
                  dot products (rounding included in the time)
  own8 q8 t       own8 q8 stored in the 16-lane tiles' order (to_wide_tiles; AVX-512 builds, else by rows)
  g16 q8, g16 q8 t  8-bit codes in groups of 16 with a factored scale (Q6_K's exact form), int8
                  activations, by rows and stored in tiles
  w8a8 int, w8a8 f32  W8A8Weight (SmoothQuant's and LLM.int8()'s matmul): x rounded per row to int8, its
                  integer dot products through torch._int_mm, or through exact float32 matmuls
                  (int8_dot_float); w8a8.int8_dot says which the engine takes
Each cell cycles through enough distinct random weights to exceed the L3 cache, as a model's
layers do. --engine adds decode tok/s and resident memory of LLM(...) with quantization
"none", "weight-only" and "auto", each in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from flashserve.quantization.group_quant_weight import GroupQuantWeight, factored_table
from flashserve.quantization.torch_int_weights import Int4Weight, Int8GroupWeight, Int8Weight
from flashserve.quantization.w8a8 import W8A8Weight, int8_dot_float, int8_matmul

L3_BYTES = 64 << 20  # cycle through at least this many weight bytes per cell


def cpu_facts() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
        flags = next((ln for ln in lines if ln.startswith("flags")), "").split()
    except OSError:
        model = platform.processor()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, flags: {' '.join(simd)}; torch {torch.__version__} " \
           f"(dispatch {torch.backends.cpu.get_cpu_capability()})"


def time_us(fns, budget: float = 0.3) -> float:
    """Best-of-3 mean µs per call over a cycle of calls with distinct weights."""
    for f in fns[:2]:
        f()
    best = float("inf")
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < budget / 3 or n == 0:
            for f in fns:
                f()
            n += len(fns)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def weights(n: int, k: int, copies: int):
    g = torch.Generator().manual_seed(0)
    out = {"fp32": [], "bf16": [], "int4": [], "int8": [], "int8 grp": [], "own4": [], "own8": [],
           "own4 q8": [], "own8 q8": [], "own8 q8 t": [], "g16 q8": [], "g16 q8 t": [], "w8a8": []}
    for _ in range(copies):
        w = torch.randn(n, k, generator=g) * 0.05
        out["fp32"].append(w)
        out["bf16"].append(w.bfloat16())
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        scale = torch.rand(n, k // 32, generator=g) * 0.01
        out["int4"].append(Int4Weight(codes, scale, torch.zeros(n, k // 32)))
        out["own4"].append(GroupQuantWeight(codes, scale, -8 * scale, bits=4))
        codes8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        out["own8"].append(GroupQuantWeight(codes8, scale, None, bits=8))
        out["w8a8"].append(W8A8Weight(w))
        out["own4 q8"].append(GroupQuantWeight(codes, scale, -8 * scale, bits=4, int8_activations=True))
        out["own8 q8"].append(GroupQuantWeight(codes8, scale, None, bits=8, int8_activations=True))
        out["own8 q8 t"].append(GroupQuantWeight(codes8.clone(), scale, None, bits=8, int8_activations=True))
        out["own8 q8 t"][-1].to_wide_tiles()
        if k % 128 == 0:  # a factored table's factor covers 8 groups
            g16 = factored_table(torch.randint(0, 129, (n, k // 16), dtype=torch.uint8, generator=g),
                                 (torch.rand(n, k // 128, generator=g) * 1e-3).half())
            for name in ("g16 q8", "g16 q8 t"):
                out[name].append(GroupQuantWeight(codes8.clone(), g16, None, bits=8, group=16, int8_activations=True))
            out["g16 q8 t"][-1].to_wide_tiles()
        out["int8"].append(Int8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                                      torch.rand(n, generator=g)))
        if n > 8192:
            out["int8 grp"].append(Int8GroupWeight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                                                   torch.rand(n, k // 32, generator=g)))
    return out


COLUMNS = ["fp32", "bf16", "int4", "int8", "int4 dq", "int8 dq", "int8 grp", "own4", "own8", "own4 dq",
           "own4 q8", "own8 q8", "own8 q8 t", "g16 q8", "g16 q8 t", "w8a8 int", "w8a8 f32"]



def kernel_table(shapes: dict[str, tuple[int, int]], ms: list[int], cols: list[str]) -> None:
    print(f"{'layer':>10} {'N x K':>12} {'M':>5} " + " ".join(f"{c:>9}" for c in cols))
    for name, (n, k) in shapes.items():
        copies = max(1, min(30, L3_BYTES // (n * k * 4) + 1))
        w = weights(n, k, copies)
        for m in ms:
            x = torch.randn(m, k)
            xb = x.bfloat16()
            fns = {
                "fp32": [lambda w=w: F.linear(x, w) for w in w["fp32"]],
                "bf16": [lambda w=w: F.linear(xb, w).float() for w in w["bf16"]],
                "int4": [lambda w=w: w.kernel(x.bfloat16()).float() for w in w["int4"]],
                "int8": [lambda w=w: w.kernel(x.bfloat16()).float() for w in w["int8"]],
                "int4 dq": [lambda w=w: w._dense_matmul(x).float() for w in w["int4"]],
                "int8 dq": [lambda w=w: w._dense_matmul(x).float() for w in w["int8"]],
                "int8 grp": [lambda w=w: w.kernel(x.bfloat16()) for w in w["int8 grp"]],
                "own4": [lambda w=w: w.kernel(x) for w in w["own4"]],
                "own8": [lambda w=w: w.kernel(x) for w in w["own8"]],
                "own4 dq": [lambda w=w: w._dense_matmul(x) for w in w["own4"]],
                "own4 q8": [lambda w=w: w.kernel(x) for w in w["own4 q8"]],
                "own8 q8": [lambda w=w: w.kernel(x) for w in w["own8 q8"]],
                "own8 q8 t": [lambda w=w: w.kernel(x) for w in w["own8 q8 t"]],
                "g16 q8": [lambda w=w: w.kernel(x) for w in w["g16 q8"]],
                "g16 q8 t": [lambda w=w: w.kernel(x) for w in w["g16 q8 t"]],
                "w8a8 int": [lambda w=w: int8_matmul(x, w.q, w.scale, lambda a, b: torch._int_mm(a, b.t()))
                             for w in w["w8a8"]],
                "w8a8 f32": [lambda w=w: int8_matmul(x, w.q, w.scale, int8_dot_float) for w in w["w8a8"]],
            }
            budget = 0.3 if n * k * m < 5e8 else 1.0
            cells = []
            for c in cols:
                skip = not fns[c] or (c.endswith("dq") and m < 16) or (c == "bf16" and m >= 256 and n > 8192) \
                    or (c in ("int4", "int8", "int8 grp") and m >= 256)  # slow and not used there
                cells.append(f"{time_us(fns[c], budget):9.0f}" if not skip else f"{'-':>9}")
            print(f"{name:>10} {f'{n}x{k}':>12} {m:>5} " + " ".join(cells), flush=True)


def engine_run(model: str, quantization: str, gen: int) -> dict:
    """One engine in this process: load, then single-stream greedy decode of `gen` tokens."""
    from flashserve import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", quantization=quantization, max_num_seqs=1, max_model_len=512,
              num_threads=torch.get_num_threads())
    status = dict(ln.split(":", 1) for ln in open("/proc/self/status").read().splitlines() if ":" in ln)
    rss = {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    llm.generate(["The history of"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        out = llm.generate(["The history of the printing press"], params, use_tqdm=False)
        best = max(best, len(out[0].outputs[0].token_ids) / (time.perf_counter() - t0))
    kv = llm.engine.num_blocks * llm.engine.config.cache.block_size
    return {"tok_s": best, "rss_MiB": rss, "kv_tokens": kv}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ms", default="1,4,16,64,256", help='batch sizes; "" for none')
    ap.add_argument("--cols", default=",".join(COLUMNS), help="kernel columns, comma-separated")
    ap.add_argument("--engine", action="store_true", help="also decode tok/s and memory, none vs auto")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--engine-one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.engine_one:
        print(json.dumps(engine_run(a.model, a.engine_one, a.gen)))
        return

    from flashserve.model.catalogue import resolve
    from flashserve.model.loader import load_model_config

    path = str(resolve(a.model))
    cfg = load_model_config(path)
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"qkv": (q + 2 * kv, d), "o": (d, q), "gate_up": (2 * cfg.intermediate_size, d),
              "down": (d, cfg.intermediate_size), "lm_head": (cfg.vocab_size, d)}
    print(f"# {cpu_facts()}")
    print(f"# {a.model}: {path}; torch threads {a.threads}; x and y float32; µs per call, best of 3")
    if a.ms:
        kernel_table(shapes, [int(m) for m in a.ms.split(",")], a.cols.split(","))
    if a.engine:
        print(f"\n# engine, single stream, {a.gen} greedy tokens (ignore_eos), dtype float32, threads {a.threads}")
        for quant in ("none", "weight-only", "auto"):
            r = subprocess.run([sys.executable, __file__, "--model", a.model, "--threads", str(a.threads),
                                "--gen", str(a.gen), "--engine-one", quant], capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:])
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            mem = ", ".join(f"{k} {v:.0f}" for k, v in res["rss_MiB"].items())
            print(f"quantization={quant:11s} {res['tok_s']:6.1f} tok/s   after load: {mem} MiB "
                  f"(KV for {res['kv_tokens']} tokens; file {os.path.getsize(path) / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
