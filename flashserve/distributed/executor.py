"""Executors: where the model runs, as seen from the engine. The engine hands each step's
SchedulerOutput to submit() and takes its RunnerOutput from collect(), oldest first; the scheduler
never leaves it. Steps run in the order submitted; under pipeline parallelism several are in
flight at once (one per stage), elsewhere the engine collects each step before it submits the next.

    UniProcExecutor    the model runner in the engine's own process (one rank)
    MultiprocExecutor  one worker process per tensor-parallel rank (distributed/multiproc.py)
    RayExecutor        one Ray actor per rank, on the nodes of a Ray cluster (distributed/ray_executor.py)
"""
from __future__ import annotations

import logging
from collections import deque

import torch

from flashserve import startup_phases
from flashserve.config import EngineConfig
from flashserve.core.sched_output import RunnerOutput, SchedulerOutput
from flashserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Executor:
    # The in-process ModelRunner when there is one (tests and benchmarks look inside it); None
    # when worker processes hold the model.
    runner: ModelRunner | None = None

    def submit(self, sched: SchedulerOutput) -> None:
        """Start a step."""
        raise NotImplementedError

    def collect(self) -> RunnerOutput:
        """The output of the oldest step submitted and not yet collected (waits for it)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stop the workers, if any; idempotent."""


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig, num_blocks: int, device: torch.device, guided,
                 eos_token_ids: tuple[int, ...]):
        self.runner = build_runner(config, num_blocks, device, guided, eos_token_ids)
        self._outputs: deque[RunnerOutput] = deque()

    def submit(self, sched: SchedulerOutput) -> None:
        self._outputs.append(self.runner.execute(sched))

    def collect(self) -> RunnerOutput:
        return self._outputs.popleft()


def build_runner(config: EngineConfig, num_blocks: int, device: torch.device, guided,
                 eos_token_ids: tuple[int, ...], tp_group=None) -> ModelRunner:
    """The model (this rank's part of it under tensor or pipeline parallelism; `tp_group` is the group
    of all ranks either way), its KV cache and its runner.
    Every rank allocates the same number of blocks, so the scheduler's block ids mean the same
    slots on all of them; a rank's blocks hold its own KV heads."""
    from flashserve.model.loader import load_model
    from flashserve.runner.kv_cache import allocate_kv_caches
    from flashserve.runner.kv_swap import allocate_swap_space, num_swap_slots

    dtype = getattr(torch, config.dtype)
    model, cfg = load_model(config.model_path, dtype=dtype, device=device, quantization=config.quantization,
                            max_weight_memory=config.max_weight_memory, activation_quant=config.activation_quant,
                            hot_neurons=config.hot_neurons, max_positions=config.scheduler.max_model_len)
    if tp_group is not None and config.parallel.pipeline_parallel_size > 1:
        from flashserve.distributed.pipeline_parallel import split_stages

        cfg = split_stages(model, tp_group.rank, tp_group.world_size)
    elif tp_group is not None:
        from flashserve.distributed.partition import tp_shards
        from flashserve.distributed.tensor_parallel import shard_model

        cfg = shard_model(model, tp_shards(cfg, tp_group.world_size)[tp_group.rank], tp_group)
    kv_caches = allocate_kv_caches(cfg, num_blocks, config.cache.block_size, dtype, device,
                                   config.cache.kv_cache_dtype)
    startup_phases.mark("KV cache reserved")
    # The C++ decode step runs all layers in one call, with no place for the all-reduces or transfers,
    # nor for layer streaming's hooks (it would hold the weights of every layer).
    return ModelRunner(model, kv_caches, config.cache.block_size, eos_token_ids, device, guided,
                       use_decode_plan=tp_group is None and config.max_weight_memory is None,
                       swap_caches=allocate_swap_space(kv_caches, num_swap_slots(config)),
                       typical_acceptance=config.speculative.typical_acceptance)


def make_executor(config: EngineConfig, num_blocks: int, device: torch.device, tokenizer, guided,
                  eos_token_ids: tuple[int, ...]) -> Executor:
    """`guided`: the engine's GuidedDecoding, shared by an in-process runner; worker processes
    build their own from `tokenizer`."""
    if config.parallel.backend == "uni":
        return UniProcExecutor(config, num_blocks, device, guided, eos_token_ids)
    if config.parallel.backend == "ray":
        from flashserve.distributed.ray_executor import RayExecutor

        return RayExecutor(config, num_blocks, device, tokenizer, eos_token_ids)
    from flashserve.distributed.multiproc import MultiprocExecutor

    return MultiprocExecutor(config, num_blocks, device, tokenizer, eos_token_ids)
