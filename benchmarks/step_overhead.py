"""Per-step overhead: one engine decode step of a 1-layer model, where almost no time is model math.

The default model is cut to its first decoder layer (same widths, same LM head); flashserve's
step is split into the model forward (embedding, one layer, final norm), the LM head plus sampler,
and the rest (scheduling, input tensors, bookkeeping, detokenization) = engine overhead.
transformers' forward of the same 1-layer model with its KV cache is printed beside it.

    python benchmarks/step_overhead.py [--model smollm2-135m] [--threads 2] [--seqs 1,8,32]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import have, header, set_threads, table


def _mean_ms(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def bench_flashserve(path: str, n: int, prompt_len: int, steps: int, dtype: str) -> dict:
    from flashserve import LLM, SamplingParams
    from flashserve.runner.input_batch import build_model_inputs
    from flashserve.sample.sampler import SamplingMetadata

    llm = LLM(model=path, dtype=dtype, max_num_seqs=max(n, 1))
    eng = llm.engine
    model = eng.runner.model
    model.model.layers = model.model.layers[:1]
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(n):
        eng.add_request(f"r{i}", {"prompt_token_ids": [(i * 31 + j) % 1000 + 1 for j in range(prompt_len)]}, params)
    running = eng.scheduler.running
    while len(running) < n or any(not r.output_token_ids for r in running):  # every prompt prefilled
        eng.step()
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        step_ms = (time.perf_counter() - t0) / steps * 1e3
        sched = eng.scheduler.schedule()  # a representative decode batch, run outside the engine
        inputs = build_model_inputs(sched.scheduled, eng.runner.block_size, eng.device)
        fwd_ms = _mean_ms(lambda: model(inputs.input_ids, inputs.positions, inputs.attn_metadata), steps)
        hidden = model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        meta = SamplingMetadata.build(params=[params] * n, output_token_ids=[[] for _ in range(n)],
                                      prompt_token_ids=[[] for _ in range(n)], generators=[None] * n,
                                      eos_token_ids=eng.eos_token_ids, device=eng.device)
        head_ms = _mean_ms(lambda: eng.runner.sampler(model.compute_logits(hidden[inputs.sample_indices]), meta),
                           steps)
    return {"step_ms": step_ms, "forward_ms": fwd_ms, "head_sample_ms": head_ms,
            "overhead_ms": step_ms - fwd_ms - head_ms}


def bench_transformers(path: str, n: int, prompt_len: int, steps: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, dtype)).eval()
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    ids = torch.randint(1, 1000, (n, prompt_len))
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(ids, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        step_ms = (time.perf_counter() - t0) / steps * 1e3
    return {"step_ms": step_ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seqs", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    set_threads(args.threads)
    from flashserve.model.catalogue import resolve

    path = str(resolve(args.model))
    header("Per-step overhead, 1-layer model (decode steps)", model=f"{args.model} cut to 1 layer ({path})",
           dtype=args.dtype, prompt_len=args.prompt_len, steps=args.steps)
    rows = []
    for n in (int(s) for s in args.seqs.split(",")):
        fs = bench_flashserve(path, n, args.prompt_len, args.steps, args.dtype)
        row = {"seqs": n, **{k: round(v, 2) for k, v in fs.items()}}
        if have("transformers"):
            hf = bench_transformers(path, n, args.prompt_len, args.steps, args.dtype)
            row["transformers_step_ms"] = round(hf["step_ms"], 2)
            row["transformers / flashserve"] = round(hf["step_ms"] / fs["step_ms"], 2)
        rows.append(row)
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
