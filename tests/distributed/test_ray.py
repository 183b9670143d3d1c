"""Tensor and pipeline parallelism through Ray actors on a local Ray instance (the engine starts one
when no `ray start` cluster is running): the same tokens as one process, and a killed actor fails loudly."""
from __future__ import annotations

import os
import signal

import pytest
import ray  # in the test extra: for users an optional one (pip install flashserve[ray])

from flashserve.errors import WorkerError
from tests.distributed.test_tensor_parallel import ENGINE, PROMPTS, run
from tests.model.tiny import hf_tiny, write_gguf

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


def test_pp2_through_ray_overlaps_micro_batches_and_gives_the_tokens_of_one_process(local_ray, tiny_gguf, tokenizer):
    prompts = [PROMPTS[i % 3][: 3 + i] for i in range(6)]
    one = run(tiny_gguf, tokenizer, prompts)
    both_busy = []
    two = run(tiny_gguf, tokenizer, prompts, pipeline_parallel_size=2, distributed_executor_backend="ray",
              worker_timeout_s=120,
              on_step=lambda engine, outputs: both_busy.append(bool(outputs) and engine._in_flight[0].scheduled))
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert sum(map(bool, both_busy)) > 5


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


def test_two_node_ray_cluster_on_one_machine(tiny_gguf, tokenizer):
    """Two Ray nodes of one CPU each (ray.cluster_utils: a head and a second raylet, as two
    `ray start` would make), so the two ranks land on different nodes and meet over TCP."""
    from ray.cluster_utils import Cluster

    from flashserve.engine.arg_utils import EngineArgs
    from flashserve.engine.llm_engine import LLMEngine

    one = run(tiny_gguf, tokenizer)
    ray.shutdown()  # the module's one-node instance, if it runs
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = EngineArgs(model=tiny_gguf, **ENGINE, tensor_parallel_size=2, distributed_executor_backend="ray",
                            num_threads=1, worker_timeout_s=120).create_engine_config()
        engine = LLMEngine(config, tokenizer=tokenizer)
        nodes = set(ray.util.placement_group_table(engine.executor._pg)["bundles_to_node_id"].values())
        engine.shutdown()
        assert len(nodes) == 2
        two = run(tiny_gguf, tokenizer, tensor_parallel_size=2, distributed_executor_backend="ray", num_threads=1,
                  worker_timeout_s=120)
        assert [o.token_ids for o in two] == [o.token_ids for o in one]
    finally:
        ray.shutdown()
        cluster.shutdown()
