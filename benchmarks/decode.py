"""Single-stream decode speed: flashserve beside transformers `generate` and llama.cpp, same GGUF.

    python benchmarks/decode.py [--model smollm2-135m] [--threads 2] [--prompt-len 32] [--gen-len 128]
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from common import have, header, measure_ceilings, set_threads, table


def bench_flashserve(path: str, prompt: list[int], gen: int, dtype: str) -> dict:
    from flashserve import LLM, SamplingParams

    llm = LLM(model=path, dtype=dtype, max_num_seqs=1)
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    eng.add_request("bench", {"prompt_token_ids": prompt}, params)
    t0 = time.perf_counter()
    first = None
    while eng.has_unfinished_requests():
        outs = eng.step()
        if first is None and outs and outs[0].outputs[0].token_ids:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"prefill_s": first - t0, "decode_tok_s": (gen - 1) / (end - first)}


def bench_transformers(path: str, prompt: list[int], gen: int, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, **kw)
        t2 = time.perf_counter()
    prefill = t1 - t0
    return {"prefill_s": prefill, "decode_tok_s": (gen - 1) / (t2 - t1 - prefill)}


def bench_llamacpp(path: str, prompt: list[int], gen: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + gen + 8, n_threads=threads, n_batch=512, verbose=False)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    tok = int(llm.scores[llm.n_tokens - 1].argmax())
    for _ in range(gen - 1):
        llm.eval([tok])
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": (gen - 1) / (t2 - t1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--dtype", default="auto", help="flashserve compute dtype")
    ap.add_argument("--hf-dtype", default="float32", help="transformers compute dtype")
    a = ap.parse_args()
    set_threads(a.threads)
    from flashserve.model.catalogue import resolve

    path = str(resolve(a.model))
    rng = random.Random(0)
    prompt = [rng.randrange(100, 30000) for _ in range(a.prompt_len)]
    ceil = measure_ceilings()
    header("single-stream decode", model=f"{a.model} ({Path(path).name})", dtype=f"flashserve {a.dtype}, transformers {a.hf_dtype}",
           sizes=f"prompt {a.prompt_len} tokens, {a.gen_len} generated (greedy, EOS ignored)",
           ceilings=", ".join(f"{k} {v:.0f}" for k, v in ceil.items()))
    rows = [{"engine": "flashserve", **bench_flashserve(path, prompt, a.gen_len, a.dtype)}]
    rows.append({"engine": f"transformers generate ({a.hf_dtype})", **bench_transformers(path, prompt, a.gen_len, a.hf_dtype)})
    if have("llama_cpp"):
        rows.append({"engine": "llama.cpp (llama-cpp-python)", **bench_llamacpp(path, prompt, a.gen_len, a.threads)})
    else:
        print("llama-cpp-python not installed: llama.cpp column skipped (pip install -e '.[bench]')")
    ours = rows[0]["decode_tok_s"]
    for r in rows:
        r["flashserve / this"] = ours / r["decode_tok_s"]
    print(table(rows, ["engine", "prefill_s", "decode_tok_s", "flashserve / this"]))


if __name__ == "__main__":
    main()
