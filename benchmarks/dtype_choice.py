"""The measurement behind dtype="auto": flashserve's decode speed with float32 against bfloat16
compute on this CPU, for the quantized kernels (quantization "auto") and for float weights
("none"), one process per run, configurations alternated, median and min-max of --repeats runs.

    python benchmarks/dtype_choice.py [--model smollm2-135m] [--concurrency 1,32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from common import header, table

WORKER = r"""
import json, random, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from flashserve import LLM, SamplingParams
model, dtype, quantization, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
gen, prompt_len = 64, 64
llm = LLM(model=model, dtype=dtype, quantization=quantization, max_num_seqs=n, max_model_len=512,
          enable_prefix_caching=False)
rng = random.Random(0)
prompts = [[rng.randrange(100, 30000) for _ in range(prompt_len)] for _ in range(n)]
llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
eng = llm.engine
for i, p in enumerate(prompts):
    eng.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=gen, ignore_eos=True))
eng.step()  # every prompt prefilled in one step (budget 2048 tokens)
t0, steps = time.perf_counter(), 0
while eng.has_unfinished_requests():
    eng.step()
    steps += 1
print(json.dumps({"decode_tok_s": n * steps / (time.perf_counter() - t0),
                  "decode_plan": eng.runner.decode_plan is not None}))
"""


def run(model: str, dtype: str, quantization: str, n: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, model, dtype, quantization, str(n), str(threads)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--quantizations", default="auto,none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    header("flashserve decode tok/s: float32 against bfloat16 compute", model=a.model, threads=a.threads,
           workload="prompts of 64 random tokens, 64 greedy tokens each, EOS ignored, decode steps only")
    rows = []
    for quantization in a.quantizations.split(","):
        for n in (int(c) for c in a.concurrency.split(",")):
            runs: dict[str, list[float]] = {"float32": [], "bfloat16": []}
            plans = {}
            for _ in range(a.repeats):  # alternated: float32, bfloat16, float32, ...
                for dtype in runs:
                    r = run(a.model, dtype, quantization, n, a.threads)
                    runs[dtype].append(r["decode_tok_s"])
                    plans[dtype] = r["decode_plan"]
            med = {d: statistics.median(v) for d, v in runs.items()}
            rows.append({"quantization": quantization, "sequences": n,
                         **{f"{d} tok/s": f"{med[d]:.1f} ({min(v):.1f}-{max(v):.1f})" for d, v in runs.items()},
                         "float32 / bfloat16": med["float32"] / med["bfloat16"],
                         "C++ decode step": " / ".join(f"{d}: {'yes' if p else 'no'}" for d, p in plans.items())})
            print(f"  {quantization} x{n}: {rows[-1]}", file=sys.stderr, flush=True)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
