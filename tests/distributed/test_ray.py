"""Tensor parallelism through Ray actors on a local Ray instance (the engine starts one when no
`ray start` cluster is running): the same tokens as one process, and a killed actor fails loudly."""
from __future__ import annotations

import os
import signal

import pytest

from flashserve.errors import WorkerError
from tests.distributed.test_tensor_parallel import ENGINE, PROMPTS, run
from tests.model.tiny import hf_tiny, write_gguf

ray = pytest.importorskip("ray")  # optional: pip install flashserve[ray]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return str(write_gguf(hf_tiny("llama"), tmp_path_factory.mktemp("ray") / "llama-Q8_0.gguf", qtype="Q8_0"))


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    from flashserve.tokenizer.tokenizer import Tokenizer

    return Tokenizer.from_model_path(smollm2_gguf)


def test_tp2_through_ray_gives_the_tokens_of_one_process(local_ray, tiny_gguf, tokenizer):
    one = run(tiny_gguf, tokenizer)
    two = run(tiny_gguf, tokenizer, tensor_parallel_size=2, distributed_executor_backend="ray", worker_timeout_s=120)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]


def test_killed_ray_actor_fails_loudly(local_ray, tiny_gguf, tokenizer):
    from flashserve import SamplingParams
    from flashserve.engine.arg_utils import EngineArgs
    from flashserve.engine.llm_engine import LLMEngine

    config = EngineArgs(model=tiny_gguf, **ENGINE, tensor_parallel_size=2, distributed_executor_backend="ray",
                        worker_timeout_s=60).create_engine_config()
    engine = LLMEngine(config, tokenizer=tokenizer)
    try:
        engine.add_request("0", {"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=100, ignore_eos=True))
        engine.step()
        os.kill(engine.executor.worker_pids[1], signal.SIGKILL)
        with pytest.raises(WorkerError, match="rank 1 died"):
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        engine.shutdown()
