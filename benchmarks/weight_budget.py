"""Layer streaming under a weight budget: decode tok/s and peak resident memory of one model at
budgets of 100% (nothing streams, the C++ decode step on), 50%, 25% of its decoder layers, one
layer, and a fixed 300 MB (300e6 bytes), for 1 and for 32 sequences; each configuration in its own
process, alternated over rounds.

    python benchmarks/weight_budget.py [--model qwen2.5-coder-1.5b] [--rounds 3] [--tokens 12]
                                       [--budgets "300 MB,100%"]

A budget of p% is the weights that always stay (norms, biases, rotary tables, the LM head's two chunk
buffers: the embedding and head stream too) plus p% of the decoder layers' packed bytes. Decode tok/s counts generated tokens over the time after every request has its
first one; peak RSS is the child's VmHWM (loading included). The packed-layer file is written before
the first round (its first run packs every layer).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import decode_tok_s

BUDGETS = ("100%", "50%", "25%", "1 layer", "300 MB")
SEQS = (1, 32)


def run_config(model: str, budget: int | None, seqs: int, tokens: int) -> dict:
    """In a child process: decode tok/s of `seqs` sequences under `budget` bytes, and VmHWM."""
    from flashserve import LLM, SamplingParams

    llm = LLM(model=model, max_weight_memory=budget, max_model_len=256, max_num_seqs=seqs,
              enable_prefix_caching=False, kv_cache_memory=256 << 20)
    eng = llm.engine
    prompts = [[100 + 7 * i + j for j in range(16)] for i in range(seqs)]
    tok_s = decode_tok_s(eng, prompts, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    streamer = getattr(eng.runner.model, "layer_streamer", None)
    return {"tok_s": tok_s, "peak_mib": int(status["VmHWM"].split()[0]) / 1024,
            "window": streamer.window if streamer is not None else eng.runner.model.config.num_layers}


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
    ap.add_argument("--budgets", default=",".join(BUDGETS), help="which budgets, comma-separated")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        budget, seqs = json.loads(a.child)
        print(json.dumps(run_config(a.model, budget, seqs, a.tokens)))
        return
    unknown = set(a.budgets.split(",")) - set(BUDGETS)
    if unknown:
        ap.error(f"unknown budgets {sorted(unknown)}; choose from {', '.join(BUDGETS)}")
    budgets = budgets_for(a.model)  # also writes the packed-layer file, once
    print(f"model {a.model}, {a.tokens} tokens per sequence after the first, 16-token prompts, "
          f"budgets (MiB): " + ", ".join(f"{k} {v / 2**20:.0f}" if v else f"{k} all" for k, v in budgets.items()))
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(a.rounds):
        for name in a.budgets.split(","):
            for seqs in SEQS:
                out = subprocess.run([sys.executable, __file__, "--model", a.model, "--tokens", str(a.tokens),
                                      "--child", json.dumps([budgets[name], seqs])],
                                     capture_output=True, text=True, check=True)
                results.setdefault((name, seqs), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"| budget | layers resident | seqs | decode tok/s (median, min-max of {a.rounds}) | peak RSS MiB (median) |")
    print("|---|---|---|---|---|")
    for (name, seqs), runs in results.items():
        tps = [r["tok_s"] for r in runs]
        print(f"| {name} | {runs[0]['window']} | {seqs} | {statistics.median(tps):.2f} ({min(tps):.2f}-{max(tps):.2f}) "
              f"| {statistics.median(r['peak_mib'] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
