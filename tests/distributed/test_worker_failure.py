"""A tensor-parallel worker that dies or hangs mid-generation: the engine raises WorkerError within
worker_timeout_s, naming what happened, and no worker process is left behind."""
from __future__ import annotations

import os
import signal
import time

import pytest

from flashserve import SamplingParams
from flashserve.engine.arg_utils import EngineArgs
from flashserve.engine.llm_engine import LLMEngine
from flashserve.errors import WorkerError

TIMEOUT_S = 15.0


@pytest.fixture
def tp_engine(tiny_llama, tokenizer_of_tiny):
    path, _ = tiny_llama
    config = EngineArgs(model=path, dtype="float32", max_model_len=256, kv_cache_memory=1 << 22,
                        tensor_parallel_size=2, worker_timeout_s=TIMEOUT_S).create_engine_config()
    engine = LLMEngine(config, tokenizer=tokenizer_of_tiny)
    pids = engine.executor.worker_pids
    yield engine
    engine.shutdown()
    for pid in pids:  # reaped: not even a zombie remains
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not _spawned_children()


@pytest.fixture(scope="module")
def tokenizer_of_tiny(tiny_llama):
    from flashserve.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_model_path(tiny_llama[0])


def _spawned_children() -> list[int]:
    """Worker processes multiprocessing spawned from this one (not its resource tracker, which lives
    as long as this interpreter)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == me and b"spawn_main" in cmd:
            found.append(int(entry))
    return found


def _generate_until_failure(engine, sabotage) -> tuple[WorkerError, float]:
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": [1, 2, 3 + i]}, params)
    for _ in range(3):
        engine.step()  # generation is under way
    sabotage()
    start = time.monotonic()
    with pytest.raises(WorkerError) as err:
        while engine.has_unfinished_requests():
            engine.step()
    return err.value, time.monotonic() - start


def test_killed_worker_fails_loudly_and_leaves_no_process(tp_engine):
    victim = tp_engine.executor.worker_pids[1]
    err, took = _generate_until_failure(tp_engine, lambda: os.kill(victim, signal.SIGKILL))
    assert took < TIMEOUT_S
    assert f"worker 1 (pid {victim}) was killed by SIGKILL" in str(err)
    with pytest.raises(WorkerError, match="the model workers have stopped"):
        tp_engine.step()  # and stays failed
    for pid in tp_engine.executor.worker_pids:  # every worker was stopped with it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_hung_worker_fails_after_the_timeout(tp_engine):
    victim = tp_engine.executor.worker_pids[1]
    err, took = _generate_until_failure(tp_engine, lambda: os.kill(victim, signal.SIGSTOP))
    assert TIMEOUT_S - 1 < took < TIMEOUT_S + 10
    assert "did not answer within worker_timeout_s=15 s" in str(err)


def test_server_engine_turns_to_503_when_a_worker_dies(tp_engine):
    """The server's engine loop: the request in flight gets the WorkerError, the loop stops, and a
    new request gets EngineDeadError, which the app answers with 503 (as /health does)."""
    import asyncio

    from flashserve.engine.async_engine import AsyncLLMEngine, EngineDeadError

    async def scenario():
        eng = AsyncLLMEngine(tp_engine)
        died = []
        eng.on_dead = lambda: died.append(True)
        eng.start()
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        stream = eng.generate({"prompt_token_ids": [1, 2, 3]}, params)
        await stream.__anext__()  # under way
        os.kill(tp_engine.executor.worker_pids[0], signal.SIGKILL)
        with pytest.raises(WorkerError, match="killed by SIGKILL"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await eng.generate({"prompt_token_ids": [4, 5]}, params).__anext__()
        await eng.stop()
        return died

    assert asyncio.run(asyncio.wait_for(scenario(), TIMEOUT_S + 10)) == [True]


def test_cli_generate_with_two_ranks_prints_what_one_prints(smollm2_gguf, capsys):
    """Weight-only: with int8 activations the all-reduce's summation order can move an activation
    across a rounding step and flip a near-tie (seen on an AVX2 host, 5 tokens in; see
    test_tp_smollm2.py's quantized test)."""
    from flashserve.entrypoints.cli import main

    outs = []
    for tp in ("1", "2"):
        assert main(["generate", "--model", smollm2_gguf, "--prompt", "The capital of France is", "--max-tokens",
                     "12", "--quantization", "weight-only", "-tp", tp]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
