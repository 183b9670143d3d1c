"""A broken C++ source must fail loudly: the strict loader raises with the compiler's message, and
the engine's lenient loader logs that message once before falling back to torch."""
from __future__ import annotations

import logging
import shutil

import pytest

from flashserve.attention import cpu_kernels as ck

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
