"""Each kind of linear of a model as the engine loaded it (its own packed weights, stored in tiles where
the build has them), timed at a few activation row counts: what a step of M rows costs against one row.

    python benchmarks/model_linears.py [--model qwen2.5-coder-1.5b] [--ms 1,2,5,8] [--repeats 7]

A call of each kind runs once per decoder layer in turn (all layers' weights, so they come from memory
as in a step); ms per call, median of the repeats, and its ratio to the first M. benchmarks/kernel_ab.py
times the kernel on random weights by rows; this times the engine's own.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--ms", default="1,2,5,8")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    ms = [int(m) for m in a.ms.split(",")]

    from flashserve import LLM

    llm = LLM(a.model, max_model_len=512, enable_prefix_caching=False)
    header("linears of the loaded model", model=a.model, ms=a.ms, repeats=a.repeats)
    model = llm.engine.runner.model
    layers = model.model.layers
    kinds = {"qkv": lambda l: l.self_attn.qkv_proj, "o": lambda l: l.self_attn.o_proj,
             "gate_up": lambda l: l.mlp.gate_up_proj, "down": lambda l: l.mlp.down_proj}
    print("| linear | " + " | ".join(f"M={m} ms" for m in ms) + " |\n|---|" + "---|" * len(ms))
    for name, get in [*kinds.items(), ("head", None)]:
        calls = ([(get(l), get(l).in_features) for l in layers] if get else
                 [(model.compute_logits, model.config.hidden_size)])
        cells = []
        for m in ms:
            xs = [torch.randn(m, k) for _, k in calls]
            per_call = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                for (f, _), x in zip(calls, xs):
                    f(x)
                per_call.append((time.perf_counter() - t0) / len(calls))
            cells.append(1e3 * statistics.median(per_call))
        print(f"| {name} | " + " | ".join(f"{c:.3f} ({c / cells[0]:.2f}x)" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
