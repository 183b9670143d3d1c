"""Where a start goes: a mark at the end of each phase of an engine's start (and of a one-shot
run's first token and last), with the wall clock and the process's resident memory then, written
as a JSON line to the file that FLASHSERVE_STARTUP_PHASES names. `flashserve bench --startup`
(benchmarks/startup.py) sets it and prints the phases; unset, a mark costs one comparison.

Times are time.monotonic(), one clock for every process of the machine, so the parent that started
the process can tell how long the interpreter took before the first mark."""
from __future__ import annotations

import json
import os
import time

ENV = "FLASHSERVE_STARTUP_PHASES"
_PATH = os.environ.get(ENV)


def mark(phase: str) -> None:
    """The phase that just ended. Nothing unless FLASHSERVE_STARTUP_PHASES is set."""
    if _PATH is None:
        return
    status = _memory_status()
    line = {"phase": phase, "t": time.monotonic(), "rss_mib": status.get("VmRSS", 0) / 1024,
            "peak_mib": status.get("VmHWM", 0) / 1024}
    with open(_PATH, "a") as f:  # a line per mark: a start that fails still leaves the phases before it
        f.write(json.dumps(line) + "\n")


def _memory_status() -> dict[str, int]:
    """VmRSS and VmHWM in KiB, from /proc (empty where there is none)."""
    try:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    except OSError:
        return {}


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
