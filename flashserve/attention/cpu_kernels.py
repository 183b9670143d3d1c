"""C++ CPU kernels, compiled on first use with torch's cpp_extension (g++ and ninja, OpenMP).

Compilation takes about a minute once per machine (the build is cached by torch). Without a
compiler the import fails softly: `cpu_kernels()` returns None and callers keep their
plain-torch paths, which compute the same thing.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp", "quant_matmul.cpp", "decode_plan.cpp")]


def _build_name() -> str:
    """-march=native builds are only valid on CPUs with the same instruction set: the torch
    extension cache is keyed by name, so the name carries a digest of this CPU's feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        import platform

        flags = platform.processor()
    # The sources' directory too: two checkouts sharing one name would make ninja rebuild the
    # extension every time a process of the other one loads it (its build file names the paths).
    key = flags + str(_SOURCES[0].parent.resolve())
    return "flashserve_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:10]


@functools.cache
def cpu_kernels():
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=_build_name(),
            sources=[str(p) for p in _SOURCES],
            # No FMA contraction: the kernels round where their comments say (a product, then a sum),
            # so results do not depend on what the compiler chose to fuse.
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported platform
        logger.warning("C++ CPU kernels unavailable (%s); using the torch implementations", exc)
        return None


def kernels_for(t) -> object | None:
    """The compiled kernels when `t` lives on the CPU and they built, else None (use torch ops)."""
    return cpu_kernels() if t.device.type == "cpu" else None
