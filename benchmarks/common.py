"""Shared benchmark helpers: machine ceilings measured in the same run, peers, and table printing."""
from __future__ import annotations

import importlib.util
import os
import platform
import time

import torch


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def measure_ceilings(seconds: float = 1.0) -> dict[str, float]:
    """Memory read bandwidth (GB/s) and bf16/fp32 matmul rate (GFLOP/s) with torch, this run. The
    buffer read is in huge pages where the kernel maps them, as the engine's weights are
    (flashserve/huge_pages.py): in 4 KiB pages the same sum read 10-15% less here, below what the
    decode GEMVs reach."""
    from flashserve.huge_pages import aligned_spans, collapse_spans

    x = torch.ones(256 * 2**20 // 4)  # 256 MiB, larger than any cache
    collapse_spans(aligned_spans(x.data_ptr(), x.nbytes))
    x.sum()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x.sum()
        reps += 1
    bw = reps * x.nbytes / (time.perf_counter() - t0) / 1e9
    out = {"mem_GBps": bw}
    for name, dt in (("bf16_GFLOPs", torch.bfloat16), ("fp32_GFLOPs", torch.float32)):
        a, b = torch.randn(1024, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
        out[name] = reps * 2 * 1024**3 / (time.perf_counter() - t0) / 1e9
    return out


def decode_tok_s(eng, prompts: list[list[int]], params) -> float:
    """Decode tok/s of the token-id prompts run together on an idle LLMEngine: the tokens generated
    after every request has its first one, over the time that took (params.ignore_eos, so all run
    params.max_tokens)."""
    for i, p in enumerate(prompts):
        eng.add_request(f"decode-{i}", {"prompt_token_ids": p}, params)
    while any(r.num_output_tokens == 0 for r in eng.scheduler.requests.values()):
        eng.step()
    start, done = time.perf_counter(), sum(r.num_output_tokens for r in eng.scheduler.requests.values())
    while eng.has_unfinished_requests():
        eng.step()
    return (len(prompts) * params.max_tokens - done) / (time.perf_counter() - start)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def header(title: str, **facts) -> None:
    """The title, what `flashserve env` reports (the CPU, its features, the kernels' level), then `facts`."""
    from flashserve.entrypoints.env import environment_report

    print(f"\n## {title}")
    print(f"host: {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for line in environment_report():
        print(line)
    for k, v in facts.items():
        print(f"{k}: {v}")


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; floats get 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
