"""Tensor and pipeline parallelism on this host: one process with T threads against T ranks of one
thread each, same model, same requests, each configuration in its own process, alternated over rounds.

    python benchmarks/tensor_parallel.py [--model smollm2-135m] [--rounds 3] [--threads 2]

Configurations: tp1 (one process, T threads, the C++ decode step on), tp1-modules (the same with
the decode step off: TP runs without it, so this isolates what the collectives cost), tpT (T worker
processes over gloo, one thread each), ppT (T pipeline stages, one thread each, one micro-batch in
flight per stage: the default), ppT-serial (the same with one step in flight: the stages take turns).
Workloads: prompt processing (32 prompts of 128 tokens, one output token each), decode of 1 and of 32 sequences (16-token prompts; time after every
request has its first token). Also the cost of the collectives alone: an all-reduce of a hidden
state and the all-gather of a vocabulary shard's logits between two processes, over gloo and through
shared memory (what worker processes on one machine use).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = ("tp1", "tp1-modules", "tpN", "ppN", "ppN-serial")
WORKLOADS = {"prompt 32x128": (32, 128, 1), "decode 1 seq": (1, 16, 128), "decode 32 seqs": (32, 16, 64)}


def run_config(model: str, config: str, threads: int) -> dict:
    """In a child process: tok/s of each workload under `config`."""
    from flashserve import LLM, SamplingParams

    tp = threads if config == "tpN" else 1
    pp = threads if config.startswith("ppN") else 1
    llm = LLM(model=model, max_model_len=512, enable_prefix_caching=False, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, num_threads=threads if tp * pp == 1 else 1,
              pipeline_micro_batches=1 if config == "ppN-serial" else None)
    eng = llm.engine
    if config == "tp1-modules":
        eng.runner.decode_plan = None
    llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    pids = getattr(eng.executor, "worker_pids", [])
    out, busy = {}, {}
    for name, (n, prompt_len, gen) in WORKLOADS.items():
        params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
        for i in range(n):
            eng.add_request(f"{name}{i}", {"prompt_token_ids": [(7 * i + j) % 1000 + 10 for j in range(prompt_len)]},
                            params)
        t0, c0 = time.perf_counter(), cpu_seconds(pids)
        while any(not r.output_token_ids for r in eng.scheduler.requests.values()):
            eng.step()
        t1, c1 = time.perf_counter(), cpu_seconds(pids)
        while eng.has_unfinished_requests():
            eng.step()
        t2, c2 = time.perf_counter(), cpu_seconds(pids)
        out[name] = n * prompt_len / (t1 - t0) if gen == 1 else n * (gen - 1) / (t2 - t1)
        (a, b, wall) = (c0, c1, t1 - t0) if gen == 1 else (c1, c2, t2 - t1)
        busy[name] = [(y - x) / wall for x, y in zip(a, b)]
    eng.shutdown()
    return {**out, "busy": busy}


def cpu_seconds(pids: list[int]) -> list[float]:
    """CPU seconds (user + system) the engine's process and each worker process have used so far."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    times = [time.process_time()]
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        times.append((int(fields[11]) + int(fields[12])) / ticks)  # utime, stime
    return times


def _collective_rank(rank: int, port: int, reps: int, out) -> None:
    import torch

    from flashserve.distributed.parallel_state import TPGroup

    torch.set_num_threads(1)
    shared = TPGroup.join(rank, 2, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 60, same_machine=True)
    gloo = TPGroup(rank, 2)  # the same process group without the shared-memory path
    res = {}
    for way, group in [("gloo", gloo), ("shared memory", shared)]:
        for name, shape, op in [("all-reduce (1, 576)", (1, 576), group.all_reduce),
                                ("all-reduce (32, 576)", (32, 576), group.all_reduce),
                                ("all-gather (1, 24576)", (1, 24576), group.all_gather),
                                ("all-gather (32, 24576)", (32, 24576), group.all_gather)]:
            x = torch.randn(shape)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                op(x)
                times.append(time.perf_counter() - t0)
            res[f"{way}: {name}"] = statistics.median(times[reps // 10 :]) * 1e6
    if rank == 0:
        out.put(res)
    shared.destroy()


def run_collectives(reps: int = 500) -> dict:
    import multiprocessing

    from flashserve.distributed.multiproc import _free_port

    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_collective_rank, args=(r, port, reps, out)) for r in range(2)]
    for p in procs:
        p.start()
    res = out.get(timeout=300)
    for p in procs:
        p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="which configurations, comma-separated")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    configs = [c for c in CONFIGS if c in a.configs.split(",")]
    if a.child:
        print(json.dumps(run_config(a.model, a.child, a.threads)))
        return
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from common import header

    header("Tensor parallel vs one process", model=a.model, threads=a.threads, rounds=a.rounds,
           workloads={k: f"{n} requests, prompt {p}, {g} new" for k, (n, p, g) in WORKLOADS.items()})
    results = {c: [] for c in configs}
    for r in range(a.rounds):
        for c in configs:
            line = subprocess.run([sys.executable, __file__, "--model", a.model, "--threads", str(a.threads),
                                   "--child", c], check=True, capture_output=True, text=True).stdout
            results[c].append(json.loads(line.strip().splitlines()[-1]))
            print(f"round {r} {c}: {results[c][-1]}", file=sys.stderr)
    names = {"tp1": f"TP=1 x {a.threads} threads", "tp1-modules": f"TP=1 x {a.threads} threads, no C++ decode step",
             "tpN": f"TP={a.threads} x 1 thread", "ppN": f"PP={a.threads} x 1 thread, {a.threads} micro-batches",
             "ppN-serial": f"PP={a.threads} x 1 thread, 1 step in flight"}
    print("\n| configuration | " + " | ".join(f"{w} tok/s" for w in WORKLOADS) + " |")
    print("|---|" + "---|" * len(WORKLOADS))
    for c in configs:
        cells = []
        for w in WORKLOADS:
            xs = [run[w] for run in results[c]]
            cells.append(f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})")
        print(f"| {names[c]} | " + " | ".join(cells) + " |")
    print("\nBusy share of the wall time (CPU seconds / seconds, median over rounds; a rank's idle share is its"
          " bubble: waiting for the previous stage, the next step or a collective; threads of a process add up):")
    print("\n| configuration | " + " | ".join(f"{w}: engine, rank 0, rank 1 ..." for w in WORKLOADS) + " |")
    print("|---|" + "---|" * len(WORKLOADS))
    for c in configs:
        cells = []
        for w in WORKLOADS:
            shares = zip(*(run["busy"][w] for run in results[c]))
            cells.append(", ".join(f"{statistics.median(x):.2f}" for x in shares))
        print(f"| {names[c]} | " + " | ".join(cells) + " |")
    med = {c: {w: statistics.median(run[w] for run in results[c]) for w in WORKLOADS} for c in configs}
    print("\nRatios of medians (pipeline: micro-batches over one step in flight; each over one process without"
          " the C++ decode step, the same layers' work on the same cores: 1 - this is the bubble plus the"
          " transfers and the engine's share of the cores):")
    for num, den in [("ppN", "ppN-serial"), ("ppN", "tp1-modules"), ("ppN-serial", "tp1-modules"),
                     ("tpN", "tp1-modules")]:
        if num not in med or den not in med:
            continue
        print(f"- {names[num]} / {names[den]}: " + ", ".join(f"{w} {med[num][w] / med[den][w]:.2f}x" for w in WORKLOADS))
    if "tpN" not in configs:
        return
    print("\nCollectives between two processes, 1 thread each, median of 500 (us):")
    for k, v in run_collectives().items():
        print(f"- {k}: {v:.0f} us")


if __name__ == "__main__":
    main()
