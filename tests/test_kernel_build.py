"""A broken C++ source must fail loudly: the strict loader raises with the compiler's message, and
the engine's lenient loader logs that message once before falling back to torch."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from flashserve.kernels import build as ck
from flashserve.kernels import ops, reference

# A fatal error on the first line: the compiler stops there, before parsing torch's headers (a
# syntax error further down cost ~40 s of compiling first).
BROKEN_LINE = '#include "flashserve_planted_missing_header.h"  // planted by the test'


def test_broken_source_fails_with_the_compilers_message(tmp_path, monkeypatch, caplog):
    src = tmp_path / "csrc"
    shutil.copytree(ck.CSRC, src)
    broken = src / ck.SOURCES[0]  # the first source ninja compiles, so the build fails early
    broken.write_text(BROKEN_LINE + "\n" + broken.read_text())
    # One job, in source order, and a build directory of the test's own (the shared cache keeps
    # only good builds).
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))

    with pytest.raises(ck.KernelBuildError) as info:
        ck.build_cpu_kernels(None, src, "flashserve_broken_build_test")
    message = str(info.value)
    assert f"{ck.SOURCES[0]}:1:" in message  # file and line, as the compiler reports them
    assert "flashserve_planted_missing_header.h: No such file or directory" in message

    # The engine's door on the same failure: None, one warning with the compiler's message.
    def fail():
        raise info.value

    monkeypatch.setattr(ck, "build_cpu_kernels", fail)
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert ck.cpu_kernels.__wrapped__() is None
    (record,) = caplog.records
    assert "flashserve_planted_missing_header.h" in record.getMessage()
    assert record.getMessage().count("torch implementations") == 1


OTHER_LEVELS = [lv.name for lv in ck.supported_levels() if lv != ck.engine_level().level]  # not the suite's own


def test_levels_follow_the_cpu():
    """The engine's level is the widest whose features /proc/cpuinfo lists; every x86 CPU it runs
    on has the portable one beneath it."""
    from tests.host import cpu_flags

    flags = cpu_flags()
    best = ck.best_level()
    assert best.needs <= flags
    wider = ck.LEVELS[: ck.LEVELS.index(best)]
    assert all(not lv.needs <= flags for lv in wider)
    assert ck.supported_levels()[-1].name == "scalar"


def test_the_engine_runs_the_widest_default_level_unless_one_is_named(monkeypatch):
    """Without FLASHSERVE_KERNEL_LEVEL the engine takes the widest level marked default; a name
    picks any level this CPU runs, and a name it does not run is refused with the reason."""
    supported = ck.supported_levels()
    try:
        monkeypatch.delenv(ck.LEVEL_ENV, raising=False)
        ck.engine_level.cache_clear()
        assert ck.engine_level().level == next(lv for lv in supported if lv.default)
        monkeypatch.setenv(ck.LEVEL_ENV, "scalar")
        ck.engine_level.cache_clear()
        assert ck.engine_level().level.name == "scalar"
        assert ck.LEVEL_ENV in ck.engine_level().reason
        monkeypatch.setenv(ck.LEVEL_ENV, "avx1024")
        ck.engine_level.cache_clear()
        with pytest.raises(ValueError, match="not a kernel level"):
            ck.engine_level()
        missing = [lv for lv in ck.LEVELS if lv not in supported]
        if missing:
            monkeypatch.setenv(ck.LEVEL_ENV, missing[0].name)
            ck.engine_level.cache_clear()
            with pytest.raises(ValueError, match="this CPU lacks"):
                ck.engine_level()
    finally:
        monkeypatch.undo()
        ck.engine_level.cache_clear()


@pytest.mark.slow  # another build of the kernels per level (one to two minutes each)
@pytest.mark.parametrize("level", OTHER_LEVELS)
def test_every_level_gives_the_same_bits_and_matches_the_twins(cpp_kernels, level):
    """The quantized matmul with int8 activations is integer arithmetic summed in one fixed float
    order (quant_matmul.cpp), so every level this CPU runs (VNNI's one-instruction dot products,
    AVX2's three, the portable loops) must give bit-identical outputs on every kernel M selects
    (GEMV, GEMM, tiled GEMM); the other kernels of that build match their torch twins."""
    import torch

    from flashserve.quantization.group_quant_weight import factored_table

    other = ck.build_cpu_kernels(level)
    gen = torch.Generator().manual_seed(0)
    for bits, zero, table, group in ((4, True, torch.float16, 32), (4, True, torch.uint8, 32),
                                     (5, False, torch.float16, 32), (8, False, torch.float32, 32),
                                     (8, True, torch.uint8, 16), (8, False, torch.float32, 16)):
        # float16 tables (as GGUF's own d and m are kept) for the 4- and 5-bit codes, float32 for 8-bit,
        # factored ones (Q4_K's integers times float16 factors, group_quant_weight.factored_table) over
        # 256-value blocks; 8-bit codes in groups of 16 as Q6_K and Q2_K take them (x rounded per 16),
        # 34 of them a row (two past the last eight)
        n, k = 72, 512 if table == torch.uint8 else 320 if group == 32 else 544
        if bits == 8:
            codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).view(torch.uint8)
        else:  # any bytes are valid 4-bit and 5-bit codes
            codes = torch.randint(0, 256, (n, k // 2 if bits == 4 else k // 32 * 20), dtype=torch.uint8, generator=gen)
        def values():
            if table == torch.uint8:
                return factored_table(torch.randint(0, 64, (n, k // group), dtype=torch.uint8, generator=gen),
                                      torch.randn(n, k // group // 8, generator=gen).half())
            return torch.randn(n, k // group, generator=gen).to(table)

        scale, z = values(), values() if zero else None
        w = cpp_kernels.group_dequantize(codes, scale, z, bits, group, 0, n)
        assert torch.equal(other.group_dequantize(codes, scale, z, bits, group, 0, n), w)
        for m in (1, 2, 3, 8, 20, 40, 130):
            x = torch.randn(m, k, generator=gen)
            want = cpp_kernels.group_quant_matmul(x, codes, scale, z, bits, group, True)
            assert torch.equal(other.group_quant_matmul(x, codes, scale, z, bits, group, True), want), (bits, group, m)
            # float activations: the same products, summed in each level's own order
            diff = other.group_quant_matmul(x, codes, scale, z, bits, group, False) - \
                cpp_kernels.group_quant_matmul(x, codes, scale, z, bits, group, False)
            assert (diff.abs() <= 2.0**-16 * (x.abs() @ w.abs().t())).all(), (bits, group, m)

    logits = torch.randn(5, 1003, generator=gen)
    logits[1, 7] = float("nan")
    assert torch.equal(other.argmax_rows(logits), logits.argmax(dim=-1))
    q6k = torch.randint(0, 256, (9, 2, 210), dtype=torch.uint8, generator=gen)
    q6k[..., 208:210] = (torch.rand(9, 2, 1, generator=gen) * 0.01).half().view(torch.uint8)  # finite d
    q6k = q6k.view(9, 420)
    for got, want in zip(other.q6k_requantize_int8(q6k), cpp_kernels.q6k_requantize_int8(q6k)):
        assert torch.equal(got, want)
    x, w = torch.randn(7, 96, generator=gen), torch.randn(96, generator=gen)
    torch.testing.assert_close(other.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    gate_up = torch.randn(9, 2 * 83, generator=gen) * 4
    for gelu in (False, True):
        torch.testing.assert_close(other.act_and_mul(gate_up, gelu), reference.act_and_mul(gate_up, gelu),
                                   atol=1e-5, rtol=1e-5)
    cos, sin = torch.rand(64, 16, generator=gen), torch.rand(64, 16, generator=gen)
    positions = torch.tensor([0, 5, 63])
    q, kk = torch.randn(3, 4, 32, generator=gen), torch.randn(3, 2, 32, generator=gen)
    want_q, want_k = reference.rotary(positions, q, kk, cos, sin)
    other.rotary_(q, positions, cos, sin)
    other.rotary_(kk, positions, cos, sin)
    torch.testing.assert_close((q, kk), (want_q, want_k), atol=1e-5, rtol=1e-5)
    # paged decode: 3 sequences over 16-token blocks, GQA 4:2, one sequence past a split
    kc, vc = torch.randn(40, 16, 2, 32, generator=gen), torch.randn(40, 16, 2, 32, generator=gen)
    table = torch.randperm(40, generator=gen)[:39].view(3, 13).to(torch.int32)
    lens = torch.tensor([5, 200, 129], dtype=torch.int32)
    # contiguous caches (the per-key path) and the engine's layout (K transposed within a block: the vector path)
    cpu = torch.device("cpu")
    engine = (ops.kv_cache_empty(kc.shape, kc.dtype, cpu, keys=True).copy_(kc),
              ops.kv_cache_empty(vc.shape, vc.dtype, cpu, keys=False).copy_(vc))
    assert engine[0].stride(1) == 1
    q = torch.randn(3, 4, 32, generator=gen)
    q_chunk = torch.randn(70, 4, 32, generator=gen)
    for kc, vc in ((kc, vc), engine):
        got = other.paged_decode_attention(q, kc, vc, table, lens, 0.17, -1, 0.0, 64)
        want = reference.paged_decode_attention(q, kc, vc, table, lens, 200, 5, 0.17, None, None, 64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # paged prefill: a 70-token chunk after 130 cached tokens of the second sequence, causal and windowed
        for window, cap in ((-1, 0.0), (50, 3.0)):
            got = other.paged_prefill_attention(q_chunk, kc, vc, table[1], 200, 0.17, window, cap)
            want = reference.paged_prefill_attention(q_chunk, kc, vc, table[1].long(), 200, 0.17,
                                                     None if window < 0 else window, cap or None)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_killed_builds_marker_does_not_hang_the_next_start(cpp_kernels, tmp_path):
    """torch marks a build in progress with a file that a killed build leaves behind; a later start
    must remove it (no build holds our lock) instead of waiting on it forever."""
    import os
    import shutil
    import subprocess
    import sys

    from torch.utils.cpp_extension import _get_build_directory

    # A private copy of the finished build (mtimes kept, so nothing is rebuilt): any other process
    # loading the kernels meanwhile (another test worker) would remove a marker left in the shared one.
    built = Path(_get_build_directory(ck._build_name(ck.engine_level().level, ck.CSRC), verbose=False))
    private = tmp_path / built.name  # torch's directory under TORCH_EXTENSIONS_DIR, as set below
    shutil.copytree(built, private, ignore=shutil.ignore_patterns("lock", "flashserve-build.lock"))
    marker = private / "lock"
    marker.touch()
    code = "from flashserve.kernels.build import build_cpu_kernels; build_cpu_kernels(); print('loaded')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
    assert not marker.exists()
    assert "left by a build that was interrupted" in done.stderr
