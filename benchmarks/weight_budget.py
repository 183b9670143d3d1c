"""Layer streaming under a weight budget: decode tok/s and peak resident memory of one model at
budgets of 100% (nothing streams, the C++ decode step on), 50%, 25% of its decoder layers, one
layer, and a fixed 300 MB (300e6 bytes), for 1 and for 32 sequences, beside llama.cpp on the same
GGUF file with its weights memory-mapped (its default) and read into memory (use_mmap off; mlock
off in both); each configuration in its own process, alternated over rounds.

    python benchmarks/weight_budget.py [--model qwen2.5-coder-1.5b] [--rounds 3] [--tokens 12]
                                       [--budgets "300 MB,100%"] [--peers llamacpp-mmap,llamacpp-read]
                                       [--memory-limit MiB]

A budget of p% is the weights that always stay (norms, biases, rotary tables, the LM head's two chunk
buffers: the embedding and head stream too) plus p% of the decoder layers' packed bytes. Decode tok/s
counts generated tokens over the time after every request has its first one; peak RSS is the child's
VmHWM (loading included). The packed-layer file is written before the first round (its first run
packs every layer).

--memory-limit runs every child in a memory cgroup of that size (benchmarks/memory_cgroup.py, root
only): a machine with that much RAM, page cache included, no swap. Each run then starts with the
model's files dropped from the page cache, and the table adds the group's peak (the child and its
page cache) and which runs the kernel killed for want of memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import decode_tok_s, header

BUDGETS = ("100%", "50%", "25%", "1 layer", "300 MB")
PEERS = ("llamacpp-mmap", "llamacpp-read")
SEQS = (1, 32)
PROMPT_LEN = 16


def prompts_of(seqs: int) -> list[list[int]]:
    return [[100 + 7 * i + j for j in range(PROMPT_LEN)] for i in range(seqs)]


def peak_rss_mib() -> float:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmHWM"].split()[0]) / 1024


def run_config(model: str, budget: int | None, seqs: int, tokens: int) -> dict:
    """In a child process: decode tok/s of `seqs` sequences under `budget` bytes, and VmHWM."""
    from flashserve import LLM, SamplingParams

    llm = LLM(model=model, max_weight_memory=budget, max_model_len=256, max_num_seqs=seqs,
              enable_prefix_caching=False, kv_cache_memory=256 << 20)
    eng = llm.engine
    tok_s = decode_tok_s(eng, prompts_of(seqs), SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    streamer = getattr(eng.runner.model, "layer_streamer", None)
    return {"tok_s": tok_s, "peak_mib": peak_rss_mib(),
            "window": streamer.window if streamer is not None else eng.runner.model.config.num_layers}


def run_peer(model: str, peer: str, seqs: int, tokens: int, threads: int) -> dict:
    """In a child process: llama.cpp's decode tok/s of the same prompts (greedy, batched), and VmHWM."""
    from llamacpp_peer import LlamaCppBatched

    from flashserve.model.catalogue import resolve

    llama = LlamaCppBatched(str(resolve(model)), seqs, seqs * (PROMPT_LEN + tokens + 8), threads,
                            use_mmap=peer == "llamacpp-mmap")
    tok_s = llama.run(prompts_of(seqs), tokens)["decode_tok_s"]
    return {"tok_s": tok_s, "peak_mib": peak_rss_mib(), "window": "all"}


def model_files(model: str) -> list[str]:
    """The GGUF file and flashserve's packed-layer files of it."""
    from pathlib import Path

    from flashserve.model.catalogue import cache_dir, resolve

    path = Path(resolve(model))
    return [str(path), *(str(f) for f in (cache_dir() / "packed").glob(f"{path.stem}-*/*") if f.is_file())]


def budgets_for(model: str) -> dict[str, int | None]:
    """Bytes of each budget, from the model's resident part and its layers' packed sizes."""
    from flashserve.engine.arg_utils import EngineArgs
    from flashserve.model.loader import load_model
    from flashserve.offload.layer_streaming import resident_bytes

    config = EngineArgs(model=model).create_engine_config()
    m, _ = load_model(config.model_path, quantization=config.quantization, max_weight_memory=1 << 50)
    from flashserve.offload.packed_layers import streamed_params

    layers = [sum(p.nbytes + 64 for _, p in streamed_params(x)) for x in m.model.layers]
    resident = resident_bytes(m)
    return {"100%": None, "50%": resident + sum(layers) // 2, "25%": resident + sum(layers) // 4,
            "1 layer": resident + max(layers), "300 MB": 300 * 10**6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="which budgets, comma-separated")
    ap.add_argument("--peers", default=",".join(PEERS), help="llama.cpp configurations beside them ('' for none)")
    ap.add_argument("--memory-limit", type=int, default=None, metavar="MiB",
                    help="run every child in a memory cgroup of this size (root)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        engine, budget, seqs = json.loads(a.child)
        import torch

        torch.set_num_threads(a.threads)
        out = (run_config(a.model, budget, seqs, a.tokens) if engine == "flashserve"
               else run_peer(a.model, engine, seqs, a.tokens, a.threads))
        print(json.dumps(out))
        return
    names, peers = a.budgets.split(",") if a.budgets else [], a.peers.split(",") if a.peers else []
    unknown = (set(names) - set(BUDGETS)) | (set(peers) - set(PEERS))
    if unknown:
        ap.error(f"unknown budgets or peers {sorted(unknown)}; choose from {', '.join(BUDGETS + PEERS)}")
    budgets = budgets_for(a.model)  # also writes the packed-layer file, once
    header("Layer streaming under a weight budget, beside llama.cpp", model=a.model, threads=a.threads,
           rounds=a.rounds, tokens=f"{a.tokens} per sequence after the first, {PROMPT_LEN}-token prompts",
           budgets_MiB=", ".join(f"{k} {v / 2**20:.0f}" if v else f"{k} all" for k, v in budgets.items()),
           memory_limit=f"{a.memory_limit} MiB cgroup, page cache dropped before each run" if a.memory_limit
           else "none")
    configs = [("flashserve", n) for n in names] + [(p, None) for p in peers]
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(a.rounds):
        for engine, name in configs:
            for seqs in SEQS:
                out = run_child(a, engine, budgets[name] if name else None, seqs)
                results.setdefault((name or engine, seqs), []).append(out)
                print(f"round {r} {name or engine} x{seqs}: {out}", file=sys.stderr)
    limited = a.memory_limit is not None
    print(f"\n| configuration | layers resident | seqs | decode tok/s (median, min-max of {a.rounds}) "
          f"| peak RSS MiB (median) |" + (" cgroup peak MiB (median) | killed (out of memory) |" if limited else ""))
    print("|---|---|---|---|---|" + ("---|---|" if limited else ""))
    for (name, seqs), runs in results.items():
        ok = [r for r in runs if not r.get("killed")]
        tps = [r["tok_s"] for r in ok]
        cells = (f"{statistics.median(tps):.2f} ({min(tps):.2f}-{max(tps):.2f}) | "
                 f"{statistics.median(r['peak_mib'] for r in ok):.0f}" if ok else "- | -")
        line = f"| {name} | {ok[0]['window'] if ok else '-'} | {seqs} | {cells} |"
        if limited:
            line += (f" {statistics.median(r['cgroup_peak_mib'] for r in runs):.0f} |"
                     f" {sum(1 for r in runs if r.get('killed'))} of {len(runs)} |")
        print(line)
    base = {seqs: statistics.median(r["tok_s"] for r in runs) for (name, seqs), runs in results.items()
            if name == "300 MB" and all(not r.get("killed") for r in runs)}
    for (name, seqs), runs in results.items():
        ok = [r["tok_s"] for r in runs if not r.get("killed")]
        if name in PEERS and ok and seqs in base:
            print(f"- 300 MB / {name} at {seqs} seq(s): {base[seqs] / statistics.median(ok):.2f}x")


def run_child(a, engine: str, budget: int | None, seqs: int) -> dict:
    """One configuration in its own process (in a fresh memory cgroup under --memory-limit)."""
    cmd = [sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens), "--threads", str(a.threads),
           "--child", json.dumps([engine, budget, seqs])]
    if a.memory_limit is None:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    from memory_cgroup import MemoryCgroup, drop_page_cache

    drop_page_cache(*model_files(a.model))
    group = MemoryCgroup(a.memory_limit << 20)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=group.enter)
        peak = group.peak_bytes() / 2**20
        if out.returncode != 0:
            if not group.oom_killed():
                raise RuntimeError(f"{engine} x{seqs} failed:\n{out.stderr[-3000:]}")
            return {"killed": True, "cgroup_peak_mib": peak}
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "cgroup_peak_mib": peak}
    finally:
        group.remove()


if __name__ == "__main__":
    main()
