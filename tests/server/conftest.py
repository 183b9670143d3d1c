"""A real server process on a free loopback port, driven with the official openai client.

The servers run the default engine (quantization and dtype "auto"); tests that need an exact
answer take it from the same engine offline (smollm2_default_llm), a second code path."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, *extra: str):
    port = free_port()
    cmd = [sys.executable, "-m", "flashserve.entrypoints.cli", "serve", "--model", model, "--port", str(port),
           "--max-num-seqs", "32", *extra]
    if "--max-model-len" not in extra:
        cmd += ["--max-model-len", "1024"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


@contextmanager
def serving(model: str, *extra: str):
    """(base URL, model) of a server started for the block and stopped after it."""
    proc, base = start_server(model, *extra)
    try:
        yield base, model
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server(smollm2_gguf):
    with serving(smollm2_gguf) as s:
        yield s


@pytest.fixture(scope="session")
def guarded_server(smollm2_gguf):
    """With an API key and a waiting queue of 2."""
    with serving(smollm2_gguf, "--api-key", "sekrit", "--max-waiting", "2", "--max-num-seqs", "1") as s:
        yield s


@pytest.fixture(scope="session")
def small_context_server(smollm2_gguf):
    """A 64-token context, so that any request the schema fuzzer makes valid finishes quickly."""
    with serving(smollm2_gguf, "--max-model-len", "64") as s:
        yield s


@pytest.fixture(scope="session")
def openapi_schema(small_context_server):
    import schemathesis

    base, _ = small_context_server
    return schemathesis.openapi.from_url(f"{base}/openapi.json")
