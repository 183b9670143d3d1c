"""vLLM's CPU build as a peer of bench.py and load_test.py: where the python of its own venv is (make
bench-vllm makes it), the environment its processes run in, and the bf16 model directory it loads."""
from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
KV_GIB = 2  # VLLM_CPU_KVCACHE_SPACE; 64 sequences of ~1k tokens of these models need less


def env(threads: int, python: str | Path) -> dict[str, str | None]:
    """What vLLM's CPU docs ask for: KV space, OpenMP threads bound to the first `threads` CPUs this
    process may use, and tcmalloc and the venv's Intel OpenMP runtime (libiomp5) preloaded when found.
    A None value means: remove that variable."""
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal")  # a soname that ld.so finds, or None
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    preload = [p for p in (tcmalloc, str(iomp) if iomp.exists() else None) if p]
    # No OMP_NUM_THREADS: the binding sizes the model worker's pool, and without it vLLM gives its
    # scheduling process one torch thread, as it runs by default.
    out: dict[str, str | None] = {"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB),
                                  "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "OMP_NUM_THREADS": None}
    if preload:
        out["LD_PRELOAD"] = ":".join(preload + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p])
    return out


def with_env(extra: dict[str, str | None]) -> dict[str, str]:
    """This process's environment with `extra` applied (None removes a variable)."""
    return {k: v for k, v in {**os.environ, **extra}.items() if v is not None}


def model_dir(gguf: str | Path) -> str:
    """The bf16 directory of `gguf`, made once (then cached) by vllm_model.py in a process of its own,
    so that the caller never holds the dequantized model."""
    got = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_model.py")), str(gguf)],
                         stdout=subprocess.PIPE, text=True, env=with_env({"TQDM_DISABLE": "1"}))
    if got.returncode:
        raise RuntimeError(f"vllm_model.py exited with code {got.returncode} (its stderr is above)")
    return got.stdout.strip().splitlines()[-1]
