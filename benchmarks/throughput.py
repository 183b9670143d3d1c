"""Offline throughput: N requests (prompt P, output G tokens, EOS ignored) with continuous batching,
static batching, transformers sequential `generate` and llama.cpp batched decode, on one GGUF.

    python benchmarks/throughput.py [--model smollm2-135m] [--num-requests 64] [--prompt-len 128] [--gen-len 128]
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from common import have, header, measure_ceilings, set_threads, table


def bench_flashserve(path, prompts, gen, dtype, scheduling, max_num_seqs) -> dict:
    from flashserve import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, scheduling=scheduling, max_num_seqs=max_num_seqs,
              enable_prefix_caching=False, max_model_len=1024)
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    eng = llm.engine
    waste = []
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    while eng.has_unfinished_requests():
        eng.step()
        waste.append(eng.scheduler.kv_cache_manager.kv_waste_fraction(eng.scheduler.running))
    dt = time.perf_counter() - t0
    return {"throughput_tok_s": len(prompts) * gen / dt, "total_s": dt,
            "kv_waste_%": 100 * sum(waste) / max(len(waste), 1)}


def bench_transformers_sequential(path, prompts, gen, dtype, sample: int) -> dict:
    """Sequential generate is slow, so it runs `sample` requests and reports its steady rate."""
    from transformers import AutoModelForCausalLM

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, dtype)).eval()
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=gen, min_new_tokens=gen)
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        for q in prompts[:sample]:
            model.generate(torch.tensor([q]), **kw)
        dt = time.perf_counter() - t0
    return {"throughput_tok_s": sample * gen / dt, "total_s": dt * len(prompts) / sample}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="flashserve compute dtype")
    ap.add_argument("--hf-dtype", default="float32", help="transformers compute dtype")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-sample", type=int, default=2, help="requests timed for transformers' sequential rate")
    a = ap.parse_args()
    set_threads(a.threads)
    from flashserve.model.catalogue import resolve

    path = str(resolve(a.model))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(a.prompt_len)] for _ in range(a.num_requests)]
    ceil = measure_ceilings()
    header("offline throughput", model=f"{a.model} ({Path(path).name})", dtype=f"flashserve {a.dtype}, transformers {a.hf_dtype}",
           sizes=f"{a.num_requests} requests, prompt {a.prompt_len}, output {a.gen_len} (greedy, EOS ignored), "
                 f"max_num_seqs {a.max_num_seqs}",
           ceilings=", ".join(f"{k} {v:.0f}" for k, v in ceil.items()))
    rows = []
    for mode in ("continuous", "static"):
        rows.append({"engine": f"flashserve {mode}",
                     **bench_flashserve(path, prompts, a.gen_len, a.dtype, mode, a.max_num_seqs)})
    rows.append({"engine": f"transformers sequential generate ({a.hf_dtype}, {a.hf_sample} timed)",
                 **bench_transformers_sequential(path, prompts, a.gen_len, a.hf_dtype, a.hf_sample)})
    if have("llama_cpp"):
        from llamacpp_peer import LlamaCppBatched

        peer = LlamaCppBatched(path, a.num_requests, a.num_requests * (a.prompt_len + a.gen_len) + 64, a.threads)
        rows.append({"engine": "llama.cpp batched (llama-cpp-python)", **peer.run(prompts, a.gen_len)})
        peer.close()
    else:
        print("llama-cpp-python not installed: llama.cpp row skipped (pip install -e '.[bench]')")
    ours = rows[0]["throughput_tok_s"]
    for r in rows:
        r["continuous / this"] = ours / r["throughput_tok_s"]
    print(table(rows, ["engine", "throughput_tok_s", "total_s", "continuous / this", "kv_waste_%"]))


if __name__ == "__main__":
    main()
