"""C++ CPU kernels, compiled on first use with torch's cpp_extension (g++ and ninja, OpenMP).

Compilation takes about a minute once per machine (the build is cached by torch). Two doors:
`build_cpu_kernels()` is strict and raises `KernelBuildError` with the compiler's output (the
tests use it, so a broken build fails them); `cpu_kernels()` is what the engine asks: on a failed
build it logs that output once and returns None, and callers keep their plain-torch paths, which
compute the same thing.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# bindings.cpp first: ninja starts the files in this order, so a broken build fails early.
SOURCES = ("bindings.cpp", "paged_decode.cpp", "fused_ops.cpp", "quant_matmul.cpp", "decode_plan.cpp")


class KernelBuildError(RuntimeError):
    """The C++ kernels did not compile or load; the message carries the compiler's output."""


def _build_name(source_dir: Path) -> str:
    """-march=native builds are only valid on CPUs with the same instruction set: the torch
    extension cache is keyed by name, so the name carries a digest of this CPU's feature flags."""
    from flashserve.cpu_info import cpu_info

    # The sources' directory too: two checkouts sharing one name would make ninja rebuild the
    # extension every time a process of the other one loads it (its build file names the paths).
    key = " ".join(sorted(cpu_info().flags)) + str(source_dir.resolve())
    return "flashserve_cpu_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:10]


@functools.cache  # one load per process: loading the same extension twice would import it twice
def build_cpu_kernels(source_dir: Path = CSRC, name: str | None = None, isa_flags: tuple[str, ...] = ()):
    """The compiled extension module built from `SOURCES` in `source_dir`, or KernelBuildError.
    isa_flags narrow -march=native (e.g. -mno-avx512vnni: the AVX2 dot products on a VNNI host),
    so that the tests can run every instruction-set level the host supports; they need a `name`."""
    name = name or _build_name(source_dir)
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=name,
            sources=[str(source_dir / s) for s in SOURCES],
            # No FMA contraction: the kernels round where their comments say (a product, then a sum),
            # so results do not depend on what the compiler chose to fuse.
            extra_cflags=["-O3", "-march=native", *isa_flags, "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, a compile error, an unloadable library
        # torch's message holds ninja's output: the failing command and the compiler's errors.
        raise KernelBuildError(f"C++ CPU kernels {name} from {source_dir}: {type(exc).__name__}: {exc}") from exc


@functools.cache
def cpu_kernels():
    """The engine's door: the kernels, or None (logged once, with the compiler's output)."""
    try:
        return build_cpu_kernels()
    except KernelBuildError as exc:
        logger.warning("%s\nFalling back to the torch implementations of these kernels.", exc)
        return None


def kernels_for(t) -> object | None:
    """The compiled kernels when `t` lives on the CPU and they built, else None (use torch ops)."""
    return cpu_kernels() if t.device.type == "cpu" else None
