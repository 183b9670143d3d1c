"""The one place the executor backend is chosen (distributed_executor_backend)."""
from __future__ import annotations

import torch

from flashserve.config import EngineConfig
from flashserve.distributed.executor import Executor, UniProcExecutor


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
