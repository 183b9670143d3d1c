"""A broken C++ source must fail loudly: the strict loader raises with the compiler's message, and
the engine's lenient loader logs that message once before falling back to torch."""
from __future__ import annotations

import logging
import shutil

import pytest

from flashserve.attention import cpu_kernels as ck
from tests.host import cpu_flags

BROKEN_LINE = "int flashserve_broken = ;  // a syntax error planted by the test"


@pytest.mark.slow  # compiles one source against torch's headers (about 20 s)
def test_broken_source_fails_with_the_compilers_message(tmp_path, monkeypatch, caplog):
    src = tmp_path / "csrc"
    shutil.copytree(ck.CSRC, src)
    broken = src / ck.SOURCES[0]  # the first source ninja compiles, so the build fails early
    lines = broken.read_text().splitlines() + [BROKEN_LINE]
    broken.write_text("\n".join(lines) + "\n")
    # One job, in source order, and a build directory of the test's own (the shared cache keeps
    # only good builds).
    monkeypatch.setenv("MAX_JOBS", "1")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))

    with pytest.raises(ck.KernelBuildError) as info:
        ck.build_cpu_kernels(src, "flashserve_broken_build_test")
    message = str(info.value)
    assert f"{ck.SOURCES[0]}:{len(lines)}:" in message  # file and line, as the compiler reports them
    assert "error: expected primary-expression" in message

    # The engine's door on the same failure: None, one warning with the compiler's message.
    def fail():
        raise info.value

    monkeypatch.setattr(ck, "build_cpu_kernels", fail)
    with caplog.at_level(logging.WARNING, logger=ck.__name__):
        assert ck.cpu_kernels.__wrapped__() is None
    (record,) = caplog.records
    assert "error: expected primary-expression" in record.getMessage()
    assert record.getMessage().count("torch implementations") == 1


@pytest.mark.slow  # a second build of the kernels (one to two minutes)
def test_every_dot_product_level_gives_the_same_bits(cpp_kernels):
    """The int8 kernels take one instruction (vpdpbusd) per four products on VNNI hosts and three
    (vpmaddubsw, vpmaddwd, vpaddd) on AVX2 ones: exact integer sums either way, so a build without
    VNNI must give bit-identical outputs on every kernel M selects (GEMV, GEMM, tiled GEMM)."""
    import torch

    if not {"avx512_vnni", "avx_vnni"} & cpu_flags():
        pytest.skip("this CPU has only the AVX2 level: the suite's own build already runs it")
    avx2 = ck.build_cpu_kernels(ck.CSRC, "flashserve_cpu_kernels_no_vnni_" + ck._build_name(ck.CSRC)[-10:],
                                ("-mno-avx512vnni", "-mno-avxvnni"))
    gen = torch.Generator().manual_seed(0)
    for bits, zero in ((4, True), (5, False), (8, False)):
        n, k = 72, 320
        if bits == 8:
            codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen).view(torch.uint8)
        else:  # any bytes are valid 4-bit and 5-bit codes
            codes = torch.randint(0, 256, (n, k // 2 if bits == 4 else k // 32 * 20), dtype=torch.uint8, generator=gen)
        # float16 tables (as GGUF's own d and m are kept) for the 4- and 5-bit codes, float32 for 8-bit
        table = torch.float16 if bits != 8 else torch.float32
        scale = torch.rand(n, k // 32, generator=gen).to(table)
        z = torch.randn(n, k // 32, generator=gen).to(table) if zero else None
        for m in (1, 3, 8, 20, 40, 130):
            x = torch.randn(m, k, generator=gen)
            want = cpp_kernels.group_quant_matmul(x, codes, scale, z, bits, 32, True)
            assert torch.equal(avx2.group_quant_matmul(x, codes, scale, z, bits, 32, True), want), (bits, m)
