"""Start-up cost of a one-shot completion: `flashserve generate` beside llama-cpp-python's
Llama(...).create_completion on the same GGUF, and `python -c "import torch"` as the floor
flashserve cannot go below. Each run is a fresh process; the commands alternate (in a rotated
order each round) so that a busy host slows them alike. Reported per command: median and
min-max wall time, median and max peak RSS (the child's own ru_maxrss, from wait4); then where
flashserve's start goes, phase by phase, from the marks it writes (flashserve/startup_phases.py).
`flashserve bench --startup [options]` runs this script.

    python benchmarks/startup.py [--model smollm2-135m] [--prompt "The capital of France is"]
        [--max-tokens 8] [--repeats 5] [--warmup 1] [--threads N] [--serve]

--serve times servers instead: from the process's start to the first 200 of /health (time to
healthy), and its resident memory then (VmRSS) and at its peak so far (VmHWM): `flashserve serve`
beside llama.cpp's own `llama-server` (built by `make llama-server`) on the same GGUF.

The warm-up round is not counted: it fills the page cache, the tokenizer cache and the weight cache
(flashserve/model/weight_cache.py), so the figures are those of a second start, not of the first one
after a fetch; the row "--no-weight-cache" packs the model file at every start, as the first start does
(which then also writes the cache entry).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import have, header, table
from flashserve import startup_phases
from load_test import find_llama_server, free_port

# Prints the completion, then a last line: the seconds Llama(...) took to load the model.
LLAMA_CPP = """
import sys, time
from llama_cpp import Llama
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
t = time.perf_counter()
llm = Llama(model_path=path, verbose=False, n_threads=int(threads) if threads else None)
load = time.perf_counter() - t
print(llm.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"])
print(load)
"""


FLASHSERVE = "flashserve generate"
PACKING = "flashserve generate --no-weight-cache"
LLAMA = "llama-cpp-python create_completion"


def commands(model_path: str, a) -> dict[str, list[str]]:
    py = sys.executable
    fs = [py, "-m", "flashserve.entrypoints.cli", "generate", "--model", model_path, "--prompt", a.prompt,
          "--max-tokens", str(a.max_tokens), "--temperature", "0"]
    fs += ["--threads", str(a.threads)] if a.threads else []
    cmds = {"python -c 'import torch' (floor)": [py, "-c", "import torch"], FLASHSERVE: fs,
            PACKING: [*fs, "--no-weight-cache"]}
    if have("llama_cpp"):
        cmds[LLAMA] = [py, "-c", LLAMA_CPP, model_path, a.prompt, str(a.max_tokens), str(a.threads or "")]
    return cmds


def run_once(cmd: list[str], phases: list | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one child process, its rusage taken by wait4
    (RUSAGE_CHILDREN would give the maximum over every child so far, not this one's). `phases`: a
    flashserve command's start phases (flashserve/startup_phases.py) are appended to it, as
    (phase, seconds, RSS MiB at its end, peak MiB so far), the process's exit last."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".jsonl") as marks:
        env = {**os.environ, startup_phases.ENV: marks.name} if phases is not None else None
        t0 = time.monotonic()  # the clock the child's marks use
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
        if phases is not None:
            phases.extend(_durations(startup_phases.read(marks.name), t0, t0 + wall, usage.ru_maxrss / 1024))
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{err.read()[-2000:]}")
        return wall, usage.ru_maxrss * 1024, out.read().strip()


def _durations(marks: list[dict], start: float, end: float, peak_mib: float) -> list[tuple[str, float, float, float]]:
    """Each mark's phase with the time since the mark before (the first since the process began)."""
    out, before = [], start
    for m in marks:
        out.append((m["phase"], m["t"] - before, m["rss_mib"], m["peak_mib"]))
        before = m["t"]
    out.append(("exit", end - before, float("nan"), peak_mib))
    return out


def phase_table(runs: list[list[tuple[str, float, float, float]]]) -> list[dict]:
    """Median over runs of each phase's seconds, RSS at its end and peak so far."""
    names = [p for p, *_ in runs[0]]
    rows = []
    for i, name in enumerate(names):
        if not all(len(r) > i and r[i][0] == name for r in runs):
            raise RuntimeError(f"runs marked different phases: {[[p for p, *_ in r] for r in runs]}")
        rows.append({"phase (in order)": name, "s (median)": statistics.median(r[i][1] for r in runs),
                     "RSS MiB at its end": statistics.median(r[i][2] for r in runs),
                     "peak MiB so far": statistics.median(r[i][3] for r in runs)})
    return rows


def server_commands(model_path: str, a) -> dict[str, list[str]]:
    """Each takes a port as its last argument."""

    threads = str(a.threads or 2)
    cmds = {"flashserve serve": [sys.executable, "-m", "flashserve.entrypoints.cli", "serve", "--model", model_path,
                                 "--threads", threads, "--port"]}
    peer = find_llama_server(None)
    if peer:
        cmds["llama-server"] = [peer, "-m", model_path, "-t", threads, "--log-disable", "--port"]
    return cmds


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a running process, bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def time_to_healthy(cmd: list[str], timeout: float = 300.0) -> tuple[float, int, int]:
    """(seconds from start to the first 200 of /health, VmRSS then, VmHWM then) of a fresh server."""
    import httpx

    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([*cmd, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd[:3])} exited with {proc.returncode}:\n{proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).status_code == 200:
                    wall = time.perf_counter() - t0
                    status = proc_status(proc.pid)
                    return wall, status["VmRSS"], status["VmHWM"]
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"{cmd[0]} not healthy within {timeout} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_main(model_path: str, a) -> None:
    cmds = server_commands(model_path, a)
    header("start-up: server time to healthy, each run a new process", model=Path(model_path).name,
           repeats=a.repeats, warmup_rounds=a.warmup, threads=a.threads or 2)
    if "llama-server" not in cmds:
        print("llama-server: not built (make llama-server), its row is skipped")
    names = list(cmds)
    runs = {n: [] for n in names}
    for r in range(a.warmup + a.repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            result = time_to_healthy(cmds[n])
            if r >= a.warmup:
                runs[n].append(result)
    rows = [{"server": n, "to healthy s (median)": statistics.median(w for w, _, _ in runs[n]),
             "s (min-max)": f"{min(w for w, _, _ in runs[n]):.3g}-{max(w for w, _, _ in runs[n]):.3g}",
             "RSS at healthy MiB (median)": statistics.median(r for _, r, _ in runs[n]) / 2**20,
             "peak RSS MiB (max)": max(h for _, _, h in runs[n]) / 2**20}
            for n in names]
    print(table(rows, list(rows[0])))
    if len(names) == 2:
        ratio = rows[0]["to healthy s (median)"] / rows[1]["to healthy s (median)"]
        print(f"time to healthy, {names[0]} / {names[1]}: {ratio:.3g}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a .gguf file or a built-in name")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="counted runs of each command")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    ap.add_argument("--threads", type=int, default=None, help="both engines' threads (default: their own)")
    ap.add_argument("--serve", action="store_true", help="time servers to healthy instead (module docstring)")
    a = ap.parse_args(argv)

    from flashserve.model.catalogue import resolve

    model_path = str(resolve(a.model))
    if a.serve:
        return serve_main(model_path, a)
    cmds = commands(model_path, a)
    header("start-up: one-shot completion, each run a new process", model=Path(model_path).name, prompt=repr(a.prompt),
           max_tokens=a.max_tokens, repeats=a.repeats, warmup_rounds=a.warmup,
           threads=a.threads or "each engine's default")
    if not have("llama_cpp"):
        print("llama-cpp-python: not installed, its row is skipped (pip install llama-cpp-python)")
    names = list(cmds)
    walls = {n: [] for n in names}
    rss = {n: [] for n in names}
    texts, phases, llama_loads = {}, [], []
    for r in range(a.warmup + a.repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:  # rotated: no command always runs first
            marks = [] if n == FLASHSERVE else None
            wall, peak, text = run_once(cmds[n], marks)
            if n == LLAMA:
                text, _, load = text.rpartition("\n")
                llama_loads.append(float(load))
            texts[n] = text
            if r >= a.warmup:
                walls[n].append(wall)
                rss[n].append(peak)
                if marks is not None:
                    phases.append(marks)
    rows = [{"command": n, "wall s (median)": statistics.median(walls[n]),
             "wall s (min-max)": f"{min(walls[n]):.3g}-{max(walls[n]):.3g}",
             "peak RSS MiB (median)": statistics.median(rss[n]) / 2**20, "peak RSS MiB (max)": max(rss[n]) / 2**20}
            for n in names]
    print(table(rows, list(rows[0])))
    for n in names:
        if texts[n]:
            print(f"{n} printed: {texts[n]!r}")
    if LLAMA in walls:  # issue 23's bound: 1.6 x `import torch` + llama.cpp's load of the model
        ours, floor = statistics.median(walls[FLASHSERVE]), statistics.median(walls[names[0]])
        load = statistics.median(llama_loads[a.warmup:])
        bound = 1.6 * floor + load
        print(f"\n{FLASHSERVE} / {LLAMA}, wall: {ours / statistics.median(walls[LLAMA]):.3g}; against 1.6 x the "
              f"floor + Llama(...)'s load ({load:.3g} s), {bound:.3g} s: {ours / bound:.3g}")
    rows = phase_table(phases)
    print(f"\nWhere {FLASHSERVE}'s start goes (the same runs; each phase from the end of the one before):")
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
