"""Perplexity of 4-bit weight quantizations on held-out text (issue 17's table).

Rows, all computed by flashserve on the same held-out chunks:
    float     the GGUF model dequantized to float32 (the float reference the methods start from)
    gguf      the shipped GGUF file on flashserve's kernels (weight-only: float activations)
    rtn       round-to-nearest 4-bit with zero points (AWQ's grid)   } `flashserve quantize`
    rtn-sym   round-to-nearest 4-bit symmetric (GPTQ's grid)         } checkpoints, loaded
    gptq, awq the two methods, calibrated on --calib                 } weight-only
    gptq-act  GPTQ with act-order (desc_act)                         }
    gptq-noclip  GPTQ with --no-clip (grids over whole ranges)      }
    smoothquant  quantization="smoothquant": W8A8 after smoothing (alpha 0.5), maxima from --calib
    smoothquant-down  the same, down_proj's input smoothed too (folded into up_proj's rows)
    llm.int8     quantization="llm.int8": outlier columns (|x| >= 6) float, the rest W8A8
    w8a8         the same W8A8 matmul with no smoothing and no outlier path (llm.int8, threshold inf)
    gguf-q4k     `flashserve quantize --method gguf --type Q4_K` of the shipped file (llama.cpp's
                 fallback: Q5_0 on rows not a multiple of 256), no importance matrix   } perplexity of
    gguf-q4k-imatrix  the same with `flashserve imatrix` on --calib                 } the file's weights
    gguf-q4k-flat  the same weighted fits with every importance 1 (the search alone)   } dequantized
    gguf-q5k, gguf-q6k (-imatrix, -flat)  likewise for Q5_K and Q6_K                    }
    llama-q3k, llama-iq4xs, llama-q2k, llama-iq2xs-imatrix, ...  written by llama.cpp's own llama-quantize
                 (`make llama-quantize`) from the shipped file, the type on every tensor that can take
                 it (--pure: not llama.cpp's mixes), --imatrix the one `flashserve imatrix` writes on
                 --calib (llama.cpp reads it); run on flashserve's kernels (weight-only: the
                 exact 8-bit forms of gguf_codebook_forms.py), the dequantized weights' perplexity
                 printed beside as a check
Each checkpoint is written by its own `flashserve quantize` process (wall time and its printed peak
memory recorded); perplexity = exp(mean NLL of every token after the first of each chunk). The GGUF
rows (but the float one) also get llama.cpp's perplexity of the same file on the same chunks, through
llama-cpp-python when it is installed.
With --speed-rounds R, each row's engine is also timed in a process of its own, rows alternated over R
rounds (median and range): one 512-token prompt (prompt tok/s) and 64 greedy tokens after it, one
sequence (decode tok/s from the first token on), the engine's default float16 KV cache, and the
process's resident set after the run and its peak (Linux's VmRSS and VmHWM). A GGUF file
perplexity reads with float activations (weight-only) is timed on the default path ("auto": the
kernels' int8 activations, the 16-lane tiles), what a user of the file runs.

    python benchmarks/quantization.py --model smollm2-135m --group-size 64 \
        --calib /usr/share/common-licenses/GPL-3 \
        --heldout /usr/share/common-licenses/Apache-2.0 /usr/share/common-licenses/MPL-2.0 --work DIR
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("rtn", "rtn-sym", "gptq", "gptq-act", "gptq-noclip", "awq")
VARIANTS = {"gptq-act": ("gptq", "--act-order"), "gptq-noclip": ("gptq", "--no-clip")}  # row → method, flag
GGUF_ROWS = {f"gguf-{t.lower().replace('_', '')}{s}": (t, s[1:]) for t in ("Q4_K", "Q5_K", "Q6_K")
             for s in ("", "-imatrix", "-flat")}  # row → (--type, importance: "imatrix", "flat" or "")
# row → llama-quantize's type and whether it gets the importance matrix (IQ2_XXS, IQ2_XS, IQ1_S and
# IQ1_M need one in llama.cpp)
LLAMA_ROWS = {f"llama-{t.lower().replace('_', '')}{s}": (t, bool(s)) for t in
              ("Q3_K", "IQ4_XS", "IQ4_NL", "Q2_K", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
               "TQ2_0", "TQ1_0")
              for s in ("", "-imatrix")}
INT8_ROWS = {  # run-time int8 methods on the float model: (row name, quantization, its options)
    "smoothquant": ("SmoothQuant W8A8, alpha 0.5", "smoothquant", {"smoothquant_alpha": 0.5}),
    "smoothquant-down": ("SmoothQuant W8A8, alpha 0.5, down_proj smoothed too", "smoothquant",
                         {"smoothquant_alpha": 0.5, "smoothquant_down_proj": True}),
    "llm.int8": ("LLM.int8(), threshold 6.0", "llm.int8", {"llm_int8_threshold": 6.0}),
    "w8a8": ("W8A8 per token x per channel, no smoothing", "llm.int8", {"llm_int8_threshold": math.inf}),
}


def quantize(model: str, method: str, group: int, calib: str, out: Path) -> dict:
    """Writes `out` unless it exists; (seconds, peak MiB) of the quantize process, or {} when reused."""
    if out.exists():
        return {}
    flags = ["--method", *VARIANTS[method]] if method in VARIANTS else ["--method", method]
    return _cli(["quantize", *flags, "--model", model, "--group-size", str(group), "--calib", calib, "--out", str(out)],
                f"quantize {method}")


def _cli(args: list[str], what: str) -> dict:
    """Runs `flashserve <args>`; (seconds, the peak memory it printed)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flashserve.entrypoints.cli", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-2000:]}")
    peak = re.search(r"peak memory (\d+) MiB", proc.stdout)
    return {"seconds": time.perf_counter() - t0, "peak_mib": int(peak.group(1)) if peak else None}


def gguf_file(model: str, row: str, calib: str, work: Path) -> tuple[Path, dict]:
    """The row's GGUF file (written unless it exists; the importance matrix too) and the cost of writing it."""
    qtype, importance = GGUF_ROWS[row]
    out = work / f"{Path(model).stem}-{row}.gguf"
    if out.exists():
        return out, {}
    flags = []
    if importance:
        imatrix = _imatrix(model, calib, work)
        if importance == "flat":
            imatrix = _flat_imatrix(imatrix)
        flags = ["--imatrix", str(imatrix)]
    return out, _cli(["quantize", "--method", "gguf", "--type", qtype, "--model", model, "--out", str(out), *flags],
                     f"quantize {row}")


def _imatrix(model: str, calib: str, work: Path, suffix: str = ".imatrix") -> Path:
    """`flashserve imatrix` of the model on the calibration text (written once): flashserve's own file,
    or with suffix ".imatrix.gguf" llama.cpp's GGUF form."""
    imatrix = work / f"{Path(model).stem}-{Path(calib).name}{suffix}"
    if not imatrix.exists():
        _cli(["imatrix", "--model", model, "--calib", calib, "--out", str(imatrix)], "imatrix")
    return imatrix


def llama_quantized(model: str, row: str, calib: str, work: Path) -> tuple[Path, dict]:
    """The row's file written by llama.cpp's llama-quantize (unless it exists) and the time it took."""
    qtype, with_imatrix = LLAMA_ROWS[row]
    out = work / f"{Path(model).stem}-{row}.gguf"
    if out.exists():
        return out, {}
    tool = sorted(Path(__file__).resolve().parent.parent.glob(".peers/llama-quantize-*/bin/llama-quantize"))
    if not tool:
        raise SystemExit("llama-quantize is not built: run `make llama-quantize`")
    flags = ["--imatrix", str(_imatrix(model, calib, work, ".imatrix.gguf"))] if with_imatrix else []
    t0 = time.perf_counter()
    proc = subprocess.run([str(tool[-1]), "--allow-requantize", "--pure", *flags, model, str(out), qtype, "2"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-quantize {row} failed:\n{proc.stderr[-2000:]}")
    return out, {"seconds": time.perf_counter() - t0}


def _flat_imatrix(imatrix: Path) -> Path:
    """An importance matrix of ones for the same weights."""
    import numpy as np

    from flashserve.quantization.imatrix import load_imatrix, save_imatrix

    flat = imatrix.with_suffix(".flat.imatrix")
    if not flat.exists():
        save_imatrix(str(flat), {k: np.ones_like(v) for k, v in load_imatrix(str(imatrix)).items()}, 0, "ones")
    return flat


def size_mib(path: str) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def perplexity(model: str, quantization: str, chunks: list[list[int]], options: dict | None = None) -> float:
    from flashserve import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", kv_cache_dtype="float32", quantization=quantization,
              max_model_len=max(map(len, chunks)) + 1, enable_prefix_caching=False, **(options or {}))
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], SamplingParams(max_tokens=1, prompt_logprobs=0),
                        use_tqdm=False)
    nll = [-out.prompt_logprobs[p][c[p]].logprob for out, c in zip(outs, chunks) for p in range(1, len(c))]
    return math.exp(sum(nll) / len(nll))


def llamacpp_perplexity(path: str, chunks: list[list[int]]) -> float | None:
    """llama.cpp's perplexity of a GGUF file on the same chunks (all-token logits through
    llama-cpp-python, no BOS added, as ours), or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    n = max(map(len, chunks))
    llm = llama_cpp.Llama(model_path=path, n_ctx=n + 1, n_batch=n, logits_all=True, verbose=False)
    nll = []
    for c in chunks:
        llm.reset()
        llm.eval(c)
        logits = np.asarray(llm.scores[: len(c) - 1], dtype=np.float64)  # (L-1, vocab): predicts c[1:]
        top = logits.max(1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(1))
        nll += list(logz - logits[np.arange(len(c) - 1), c[1:]])
    llm.close()
    return math.exp(sum(nll) / len(nll))


def speed(model: str, quantization: str, options: dict, prompt_len: int = 512, gen: int = 64) -> dict:
    """Prompt and single-stream decode tok/s of one engine (run in a process of its own)."""
    import random

    from flashserve import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", quantization=quantization, max_num_seqs=1,
              max_model_len=prompt_len + gen + 8, enable_prefix_caching=False, **options)
    prompt = random.Random(0).choices(range(1000, 20000), k=prompt_len)
    llm.generate([{"prompt_token_ids": prompt[:64]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    eng = llm.engine
    eng.add_request("bench", {"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=gen,
                                                                           ignore_eos=True))
    t0, first = time.perf_counter(), None
    while eng.has_unfinished_requests():
        outs = eng.step()
        if first is None and outs and outs[0].outputs[0].token_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    status = Path("/proc/self/status").read_text()  # the process's resident set after the run, and its peak
    mib = {key: int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}
    return {"prompt_tok_s": prompt_len / (first - t0), "decode_tok_s": (gen - 1) / (end - first),
            "resident_mib": mib["VmRSS"], "peak_mib": mib["VmHWM"]}


def timed_rows(rows: list[tuple[str, str, str, dict]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """{row name: {measure: [one value per round]}}, each row's engine in its own process, rows alternated."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for name, path, quantization, options in rows:
            job = json.dumps({"model": path, "quantization": quantization, "options": options})
            proc = subprocess.run([sys.executable, __file__, "--speed-worker", job], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"speed of {name} failed:\n{proc.stderr[-2000:]}")
            for key, value in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                out.setdefault(name, {}).setdefault(key, []).append(value)
            print(f"round {r + 1} {name}: {proc.stdout.strip().splitlines()[-1]}", flush=True)
    return out


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    if sys.argv[1:2] == ["--speed-worker"]:
        job = json.loads(sys.argv[2])
        print(json.dumps(speed(job["model"], job["quantization"], job["options"])))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a GGUF file or built-in name")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--heldout", nargs="+", required=True)
    ap.add_argument("--chunk", type=int, default=512, help="tokens per held-out chunk")
    ap.add_argument("--work", required=True, help="directory for the checkpoints (reused when present)")
    ap.add_argument("--methods", nargs="+", default=[*METHODS, *INT8_ROWS, "gguf-q4k", "gguf-q4k-imatrix"],
                    choices=[*METHODS, *INT8_ROWS, *GGUF_ROWS, *LLAMA_ROWS])
    ap.add_argument("--speed-rounds", type=int, default=0, help="also time each row's engine this many rounds")
    a = ap.parse_args()

    from flashserve.model.catalogue import resolve
    from flashserve.tokenizer.tokenizer import Tokenizer

    gguf = str(resolve(a.model))
    text = "\n\n".join(Path(f).read_text() for f in a.heldout)
    ids = Tokenizer.from_model_path(gguf).encode(text, add_special_tokens=False)
    chunks = [ids[i : i + a.chunk] for i in range(0, len(ids) - a.chunk + 1, a.chunk)]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"model {a.model}, group size {a.group_size}, calibration {a.calib}, held-out {len(chunks)} x {a.chunk} "
          f"tokens from {', '.join(Path(f).name for f in a.heldout)}", flush=True)
    rows = [("float (GGUF dequantized)", gguf, "none", {}), ("shipped GGUF", gguf, "weight-only", {})]
    options = {"float (GGUF dequantized)": {}, "shipped GGUF": {}}
    for method in a.methods:
        if method in INT8_ROWS:
            name, quantization, opts = INT8_ROWS[method]
            rows.append((name, gguf, quantization, {}))
            options[name] = opts | ({"calibration_text": a.calib} if quantization == "smoothquant" else {})
            continue
        if method in GGUF_ROWS:  # the file's weights dequantized: the same numbers on any kernel build
            path, cost = gguf_file(gguf, method, a.calib, work)
            rows.append((method, str(path), "none", cost))
            continue
        if method in LLAMA_ROWS:  # on the kernels' exact forms; the dequantized figure printed as a check
            path, cost = llama_quantized(gguf, method, a.calib, work)
            rows.append((method, str(path), "weight-only", cost))
            continue
        out = work / f"{Path(gguf).stem}-{method}-g{a.group_size}"
        rows.append((f"{method} g{a.group_size}", str(out), "weight-only",
                     quantize(gguf, method, a.group_size, a.calib, out)))
    results = []
    peer: dict[str, float | None] = {}  # llama.cpp's perplexity of each GGUF row's file
    for name, path, quantization, cost in rows:
        ppl = perplexity(path, quantization, chunks, options.get(name))
        results.append((name, ppl, cost))
        if path.endswith(".gguf") and quantization in ("none", "weight-only") and name != rows[0][0]:
            peer[name] = llamacpp_perplexity(path, chunks)
        check = f", dequantized {perplexity(path, 'none', chunks):.4f}" if name in LLAMA_ROWS else ""
        print(f"{name}: {ppl:.4f}{check}" + (f" (llama.cpp {peer[name]:.4f})" if peer.get(name) else ""), flush=True)
    speed_rows = [(n, p, "auto" if q == "weight-only" and p.endswith(".gguf") else q, options.get(n, {}))
                  for n, p, q, _ in rows]
    times = timed_rows(speed_rows, a.speed_rounds) if a.speed_rounds else {}
    ref = results[0][1]
    gap = {n: p - ref for n, p, _ in results}
    speed_head = " prompt tok/s | decode tok/s |" if times else ""
    print(f"\n| weights | perplexity | vs float | llama.cpp perplexity | file MiB | quantize time | quantize peak RSS |"
          f"{speed_head}")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if times else ""))
    sizes = {name: size_mib(path) for name, path, _, _ in rows}
    for name, ppl, cost in results:
        spent = f"{cost['seconds']:.0f} s" if cost else ""
        peak = f"{cost['peak_mib']} MiB" if cost.get("peak_mib") else ""
        timed = (f" {_median_range(times[name]['prompt_tok_s'])} | {_median_range(times[name]['decode_tok_s'])} |"
                 if times else "")
        theirs = f"{peer[name]:.3f} ({100 * (peer[name] / ppl - 1):+.2f}%)" if peer.get(name) else ""
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / ref - 1):+.2f}% | {theirs} | {sizes[name]:.1f} | {spent} | {peak} |"
              f"{timed}")
    for method, base in (("gptq", "rtn-sym"), ("gptq-act", "rtn-sym"), ("gptq-noclip", "rtn-sym"), ("awq", "rtn")):
        m, b = f"{method} g{a.group_size}", f"{base} g{a.group_size}"
        if m in gap and b in gap and gap[b] > 0:
            print(f"{method}: closes {100 * (1 - gap[m] / gap[b]):.0f}% of {base}'s gap to float "
                  f"(target >= 50%)")
    for row in GGUF_ROWS:
        plain = row.removesuffix("-imatrix")
        if row != plain and row in gap and plain in gap:
            print(f"{row}: perplexity {gap[row] + ref:.3f} against {gap[plain] + ref:.3f} without "
                  f"(target: lower)")


if __name__ == "__main__":
    main()
