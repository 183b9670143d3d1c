"""RayExecutor: one Ray actor per tensor-parallel rank, placed by a placement group, so the ranks
can sit on several machines of a Ray cluster (`ray start --head` on one, `ray start --address=...`
on the others; the engine joins that cluster, or starts a local one when there is none).

The actors run what worker.py's processes run (the same start-up and runner). A step is put in
Ray's object store once and every actor reads it; rank 0's result is the RunnerOutput. An actor
runs the calls of one caller in the order they were made, so several steps may be in flight
(pipeline micro-batches), collected oldest first. While it
waits the engine watches every rank's result: an actor that died, raised, or did not answer within
worker_timeout_s stops them all and raises WorkerError. Ranks meet over torch.distributed at
rank 0's node address (gloo, or NCCL on CUDA; through shared memory when all sit on one node).
"""
from __future__ import annotations

import logging
import pickle
import time
from collections import deque

import torch

from flashserve.config import EngineConfig, usable_cores
from flashserve.core.sched_output import RunnerOutput, SchedulerOutput
from flashserve.distributed.executor import Executor
from flashserve.distributed.worker import WorkerSpec
from flashserve.errors import WorkerError

logger = logging.getLogger(__name__)


class RayWorker:
    """One rank, as a Ray actor."""

    def __init__(self):
        self.answer, self.runner, self.group = False, None, None

    def meeting_point(self) -> str:
        """tcp://this node's address:a free port, where the ranks rendezvous (asked of rank 0)."""
        import ray

        from flashserve.distributed.multiproc import _free_port

        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port(all_interfaces=True)}"

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def start(self, spec: WorkerSpec) -> int:
        from flashserve.distributed.worker import start_rank

        self.answer = spec.rank == spec.config.parallel.answer_rank
        self.group, self.runner = start_rank(spec)
        import os

        return os.getpid()

    def execute(self, data: bytes) -> RunnerOutput | None:
        out = self.runner.execute(pickle.loads(data))
        return out if self.answer else None


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, num_blocks: int, device: torch.device, tokenizer,
                 eos_token_ids: tuple[int, ...]):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        par = config.parallel
        tp, self.timeout_s = par.world_size, par.worker_timeout_s
        self._answer = par.answer_rank
        threads = config.num_threads or max(1, usable_cores() // tp)  # as MultiprocExecutor: this node's view
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)  # the cluster `ray start` made, else a local one
        self._pg = placement_group([{"CPU": threads}] * tp, strategy="PACK")
        ready, _ = ray.wait([self._pg.ready()], timeout=self.timeout_s)
        if not ready:
            ray.util.remove_placement_group(self._pg)
            raise WorkerError(f"the Ray cluster has no room for {tp} ranks of {threads} CPU(s) each within "
                              f"worker_timeout_s={self.timeout_s:g} s (ray status shows its resources)")
        actor = ray.remote(RayWorker)
        self._actors = [actor.options(num_cpus=threads, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self._pg, placement_group_bundle_index=r)).remote() for r in range(tp)]
        self._in_flight: deque[list] = deque()  # each submitted step's result refs, one per rank
        init_method = self._wait([self._actors[0].meeting_point.remote()], "start-up")[0]
        one_node = len(set(self._wait([a.node_id.remote() for a in self._actors], "start-up"))) == 1
        specs = [WorkerSpec(config, num_blocks, str(device), eos_token_ids, tokenizer, r, tp, init_method, threads,
                            same_machine=one_node) for r in range(tp)]
        self.worker_pids = self._wait([a.start.remote(s) for a, s in zip(self._actors, specs)], "start-up")
        logger.info("%d tensor-parallel Ray actors up at %s, %d threads each", tp, init_method, threads)

    def submit(self, sched: SchedulerOutput) -> None:
        import ray

        self._check_running()
        data = ray.put(pickle.dumps(sched, protocol=pickle.HIGHEST_PROTOCOL))  # stored once, read by every rank
        self._in_flight.append([a.execute.remote(data) for a in self._actors])

    def collect(self) -> RunnerOutput:
        self._check_running()
        return self._wait(self._in_flight.popleft(), "a step")[self._answer]

    def _wait(self, refs: list, what: str) -> list:
        """Every ref's result, in order, once all are done; WorkerError on a rank that died or
        raised, or on the timeout."""
        import ray

        deadline, pending, results = time.monotonic() + self.timeout_s, list(refs), {}
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                ranks = sorted(refs.index(r) for r in pending)
                self._fail(f"tensor-parallel rank(s) {ranks} did not answer within worker_timeout_s="
                           f"{self.timeout_s:g} s during {what} (a worker hung)")
            try:
                results[refs.index(done[0])] = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                self._fail(f"tensor-parallel rank {refs.index(done[0])} died during {what}: {exc}")
            except ray.exceptions.RayError as exc:
                dead = self._dead_rank(refs, pending)
                if dead is not None:  # a peer's death broke this rank's collective: name the cause
                    self._fail(f"tensor-parallel rank {dead} died during {what} (rank {refs.index(done[0])} "
                               f"then failed in a collective with it)")
                self._fail(f"tensor-parallel rank {refs.index(done[0])} failed during {what}:\n{exc}")
        return [results[i] for i in range(len(refs))]

    @staticmethod
    def _dead_rank(refs: list, pending: list, grace_s: float = 5.0) -> int | None:
        """The rank among `pending` whose actor died, if one shows within grace_s: when a rank
        dies, its peers' collectives fail too, often before Ray reports the death itself."""
        import ray

        deadline = time.monotonic() + grace_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                return None
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError:
                return refs.index(done[0])
            except ray.exceptions.RayError:
                pass
        return None

    def _fail(self, what: str) -> None:
        self._failure = what
        self.shutdown()
        raise WorkerError(f"tensor-parallel inference failed: {what}")

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized() or self._pg is None:
            return
        for a in self._actors:
            ray.kill(a)
        ray.util.remove_placement_group(self._pg)
        self._pg = None
