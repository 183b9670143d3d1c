"""Online serving: requests arrive as a Poisson process (or all at once) at flashserve's
OpenAI server and, when installed, llama.cpp's (`llama_cpp.server`), same GGUF, same client.

    python benchmarks/serve.py [--model smollm2-135m] [--rate 4] [--num-requests 64] [--max-tokens 64]

Per engine: output throughput, time to first token and inter-token latency (p50/p99).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx

from common import have, header, table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


async def one_request(client, url, model, prompt, max_tokens, delay) -> dict:
    await asyncio.sleep(delay)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0 if stamps else None, "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
            "chunks": len(stamps), "end": time.perf_counter()}


async def run_load(port, model, prompts, max_tokens, rate, seed) -> dict:
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if rate > 0:
            t += rng.expovariate(rate)
    url = f"http://127.0.0.1:{port}/v1/completions"
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, model, p, max_tokens, d)
                                         for p, d in zip(prompts, delays)))
    wall = max(r["end"] for r in results) - start
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"req_per_s": len(prompts) / wall, "out_chunks_per_s": sum(r["chunks"] for r in results) / wall,
            "ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
            "itl_p50_ms": 1000 * pct(gaps, 0.5), "itl_p99_ms": 1000 * pct(gaps, 0.99),
            "mean_itl_ms": 1000 * statistics.fmean(gaps) if gaps else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second; 0 = all at once")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from flashserve.model.catalogue import resolve

    path = str(resolve(a.model))
    rng = random.Random(0)
    words = "the cache block token model server request stream batch prefix memory attention".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 400))) for _ in range(a.num_requests)]
    header("online serving", model=f"{a.model} ({os.path.basename(path)})", dtype=a.dtype, threads=a.threads,
           sizes=f"{a.num_requests} requests, prompts 8-400 words, {a.max_tokens} output tokens, "
                 f"arrivals {'all at once' if a.rate <= 0 else f'Poisson {a.rate}/s'}")
    rows = []
    port = free_port()
    proc = start([sys.executable, "-m", "flashserve.entrypoints.cli", "serve", "--model", path, "--port", str(port),
                  "--dtype", a.dtype, "--threads", str(a.threads), "--max-model-len", "2048"], port)
    try:
        rows.append({"engine": "flashserve", **asyncio.run(run_load(port, path, prompts, a.max_tokens, a.rate, 1))})
    finally:
        proc.terminate()
        proc.wait()
    if have("llama_cpp") and have("sse_starlette"):
        port = free_port()
        proc = start([sys.executable, "-m", "llama_cpp.server", "--model", path, "--port", str(port),
                      "--n_threads", str(a.threads), "--n_ctx", "4096",
                      "--interrupt_requests", "False"], port)
        try:
            rows.append({"engine": "llama.cpp server", **asyncio.run(
                run_load(port, path, prompts, a.max_tokens, a.rate, 1))})
        finally:
            proc.terminate()
            proc.wait()
    else:
        print("llama_cpp.server not available (pip install 'llama-cpp-python[server]'): peer row skipped")
    ours = rows[0]["out_chunks_per_s"]
    for r in rows:
        r["flashserve / this (throughput)"] = ours / r["out_chunks_per_s"]
    print(table(rows, ["engine", "req_per_s", "out_chunks_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
                       "itl_p99_ms", "flashserve / this (throughput)"]))
    print("out_chunks_per_s counts streamed text chunks (one per token for both servers, greedy).")


if __name__ == "__main__":
    main()
