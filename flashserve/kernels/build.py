"""C++ CPU kernels, compiled on first use with torch's cpp_extension (g++ and ninja, OpenMP), for an
instruction-set level chosen at run time from what this CPU reports.

The same sources build at every level (simd.h picks the intrinsics the level's flags allow): the
portable scalar code, AVX2 with FMA and F16C, AVX2 plus AVX-VNNI (Intel's 256-bit int8 dot products
on client cores), AVX-512 (F/BW/VL) with VNNI, and that plus AMX's int8 tiles. Each level is built under its own name, so one
cache can hold several, and nothing is compiled for the machine that happened to build it
(no -march=native): a build is valid on every CPU that has its level's features.

Compilation takes under a minute per level on two cores (cached by torch). Two doors: `build_cpu_kernels()` is
strict and raises `KernelBuildError` with the compiler's output (the tests use it, so a broken
build fails them); `cpu_kernels()` is what the engine asks: on a failed build it logs that output
once and returns None, and callers keep the torch twins (kernels/reference.py).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flashserve.cpu_info import CPUInfo, cpu_info

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# bindings.cpp first: ninja starts the files in this order, so a broken build fails early. The two
# with Python bindings (pybind11 and torch's casters: the longest to compile) start first.
SOURCES = ("bindings.cpp", "decode_plan.cpp", "paged_decode.cpp", "prefill_attention.cpp", "fused_ops.cpp",
           "quant_matmul.cpp", "gguf_repack.cpp", "shm_barrier.cpp", "huge_page_alloc.cpp", "kv_write.cpp")


@dataclass(frozen=True)
class ISALevel:
    name: str
    needs: frozenset[str]  # /proc/cpuinfo flags the build's instructions require
    cflags: tuple[str, ...]
    # False: built and tested on the CPUs that have it, but run only when LEVEL_ENV names it (a level
    # that has not yet measured faster than the one below it).
    default: bool = True


_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_AVX512_NEEDS = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
_AVX512 = (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
# Widest first: the engine takes the first default level whose features this CPU has (engine_level).
# AMX runs only once the build's amx_ready() says the OS granted its tile state and a self-test passed;
# it is not a default: its tile products, one span of weights at a time, were slower than VNNI's.
LEVELS = (
    ISALevel("avx512_amx", _AVX512_NEEDS | {"amx_tile", "amx_int8"}, (*_AVX512, "-mamx-tile", "-mamx-int8"),
             default=False),
    ISALevel("avx512_vnni", _AVX512_NEEDS, _AVX512),
    ISALevel("avx_vnni", frozenset({"avx2", "fma", "f16c", "avx_vnni"}), (*_AVX2, "-mavxvnni")),
    ISALevel("avx2", frozenset({"avx2", "fma", "f16c"}), _AVX2),
    ISALevel("scalar", frozenset(), ()),
)
LEVELS_BY_NAME = {level.name: level for level in LEVELS}


class KernelBuildError(RuntimeError):
    """The C++ kernels did not compile or load; the message carries the compiler's output."""


def supported_levels(cpu: CPUInfo | None = None) -> list[ISALevel]:
    """Every level this CPU can run, widest first (the tests build and compare each)."""
    flags = (cpu or cpu_info()).flags
    x86 = bool(flags & {"sse2", "avx"})  # the scalar level is portable; the others are x86 only
    return [lv for lv in LEVELS if lv.needs <= flags and (x86 or not lv.cflags)]


def best_level(cpu: CPUInfo | None = None) -> ISALevel:
    return supported_levels(cpu)[0]


@dataclass(frozen=True)
class LevelChoice:
    level: ISALevel
    reason: str


LEVEL_ENV = "FLASHSERVE_KERNEL_LEVEL"


@functools.cache
def engine_level() -> LevelChoice:
    """The level the engine runs: the one LEVEL_ENV names, else the widest default level this CPU
    has. A level with AMX tiles runs only where its build says they are usable (the OS grants a
    process the tile state on request, and a self-test checks the unit); else the next level."""
    levels = supported_levels()
    asked = os.environ.get(LEVEL_ENV)
    if asked:
        if asked not in LEVELS_BY_NAME:
            raise ValueError(f"{LEVEL_ENV}={asked!r}: not a kernel level (levels: {', '.join(LEVELS_BY_NAME)})")
        isa = LEVELS_BY_NAME[asked]
        if isa not in levels:
            raise ValueError(f"{LEVEL_ENV}={asked}: this CPU lacks {sorted(isa.needs - cpu_info().flags)}")
        if not _tiles_refused(isa):
            return LevelChoice(isa, f"named by {LEVEL_ENV}")
        fallback = next(lv for lv in levels[levels.index(isa) + 1:] if lv.default)
        return LevelChoice(fallback, f"{LEVEL_ENV} named {asked}, but the OS refused its tile state or "
                                     "its self-test failed")
    isa = next(lv for lv in levels if lv.default)
    if isa is levels[0]:
        return LevelChoice(isa, "the widest of those this CPU runs")
    return LevelChoice(isa, f"the widest default level; {levels[0].name} runs when {LEVEL_ENV} names it")


def _tiles_refused(isa: ISALevel) -> bool:
    return "amx_tile" in isa.needs and not build_cpu_kernels(isa.name).amx_ready()


def _build_name(level: ISALevel, source_dir: Path) -> str:
    # The sources' directory is in the name: two checkouts sharing one name would make ninja rebuild
    # the extension every time a process of the other one loads it (its build file names the paths).
    digest = hashlib.sha256(str(source_dir.resolve()).encode()).hexdigest()[:10]
    return f"flashserve_cpu_kernels_{level.name}_{digest}"


@functools.cache  # one load per process and level: loading the same extension twice would import it twice
def build_cpu_kernels(level: str | None = None, source_dir: Path = CSRC, name: str | None = None):
    """The compiled extension module for `level` (default: the widest this CPU runs) built from
    `SOURCES` in `source_dir`, or KernelBuildError."""
    if level is None:  # one name per level, so that the engine's level and the same one asked by name load once
        return build_cpu_kernels(engine_level().level.name, source_dir, name)
    isa = LEVELS_BY_NAME[level]
    if not isa.needs <= cpu_info().flags:
        raise KernelBuildError(f"C++ CPU kernels: this CPU lacks {sorted(isa.needs - cpu_info().flags)} "
                               f"for level {isa.name}")
    name = name or _build_name(isa, source_dir)
    try:
        from torch.utils.cpp_extension import load

        with _build_lock(name):
            return load(
                name=name,
                sources=[str(source_dir / s) for s in SOURCES],
                # No FMA contraction: the kernels round where their comments say (a product, then a sum),
                # so results do not depend on what the compiler chose to fuse.
                extra_cflags=["-O3", *isa.cflags, "-fopenmp", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja, a compile error, an unloadable library
        # torch's message holds ninja's output: the failing command and the compiler's errors.
        raise KernelBuildError(f"C++ CPU kernels {name} from {source_dir}: {type(exc).__name__}: {exc}") from exc


class _build_lock:
    """Held around a build. torch marks a build in progress with a plain file that a killed build
    (Ctrl-C during the first minute of a first run) leaves behind, and every later start then waits
    on it forever. This lock is the kernel's (flock, released when its holder dies), so whoever holds
    it knows that no other build is running, and a marker file found then is stale and removed."""

    def __init__(self, name: str):
        from torch.utils.cpp_extension import _get_build_directory

        self.build_dir = Path(_get_build_directory(name, verbose=False))

    def __enter__(self):
        self.file = open(self.build_dir / "flashserve-build.lock", "w")
        fcntl.flock(self.file, fcntl.LOCK_EX)
        stale = self.build_dir / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build that was interrupted", stale)
            stale.unlink()
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


@functools.cache
def cpu_kernels():
    """The engine's door: the kernels at this CPU's best level, or None (logged once, with the
    compiler's output)."""
    try:
        return build_cpu_kernels()
    except KernelBuildError as exc:
        logger.warning("%s\nFalling back to the torch implementations of these kernels.", exc)
        return None
