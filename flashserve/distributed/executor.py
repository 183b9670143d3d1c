"""Executors: where the model runs, as seen from the engine. The engine hands each step's
SchedulerOutput to submit() and takes its RunnerOutput from collect(), oldest first; the scheduler
never leaves it. Steps run in the order submitted; under pipeline parallelism several are in
flight at once (one per stage), elsewhere the engine collects each step before it submits the next.

    UniProcExecutor    the model runner in the engine's own process (one rank)
    MultiprocExecutor  one worker process per tensor-parallel rank (distributed/multiproc.py)
    RayExecutor        one Ray actor per rank, on the nodes of a Ray cluster (distributed/ray_executor.py)

make_executor (distributed/executors.py) picks one from the configuration.
"""
from __future__ import annotations

from collections import deque

import torch

from flashserve.config import EngineConfig
from flashserve.core.sched_output import RunnerOutput, SchedulerOutput
from flashserve.distributed.rank_runner import build_runner
from flashserve.errors import WorkerError
from flashserve.runner.model_runner import ModelRunner


class Executor:
    # The in-process ModelRunner when there is one (tests and benchmarks look inside it); None
    # when worker processes hold the model.
    runner: ModelRunner | None = None
    # Why the model workers stopped, once they have (set by the executors that have workers).
    _failure: str | None = None

    def _check_running(self) -> None:
        """Raise WorkerError once the workers have stopped: no step goes to them after a failure."""
        if self._failure is not None:
            raise WorkerError(f"the model workers have stopped: {self._failure}")

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
