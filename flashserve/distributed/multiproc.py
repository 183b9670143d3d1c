"""MultiprocExecutor: one spawned worker process per tensor-parallel rank (distributed/worker.py),
torch.distributed between them, pipes to the engine.

A step's SchedulerOutput is pickled once and the same bytes go down every rank's pipe; the
RunnerOutput comes back from rank 0 (from the last stage under pipeline parallelism). Each rank
runs its steps in the order they came and rank 0 answers in that order, so several steps may be in
flight (pipeline micro-batches). While it waits, the engine watches every worker's pipe and
process: a worker that reports an error, exits or is killed, or a step (or start-up) that takes
longer than worker_timeout_s, stops all workers and raises WorkerError naming what happened.
Workers are daemons, stopped on shutdown(), when the executor is collected and at exit, and
each leaves when the engine's end of its pipe closes: none outlives the engine.
"""
from __future__ import annotations

import logging
import pickle
import signal
import socket
import time
import weakref
from multiprocessing.connection import wait

import torch
import torch.multiprocessing as mp

from flashserve.config import EngineConfig, usable_cores
from flashserve.core.sched_output import RunnerOutput, SchedulerOutput
from flashserve.distributed.executor import Executor
from flashserve.distributed.worker import WorkerSpec, run_worker
from flashserve.errors import WorkerError

logger = logging.getLogger(__name__)

STOP_GRACE_S = 3.0  # a worker told to stop has this long to exit before it is terminated, then killed
REPORT_GRACE_S = 1.0  # after one worker's failure, how long to wait for the others' deaths to be visible


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, num_blocks: int, device: torch.device, tokenizer,
                 eos_token_ids: tuple[int, ...]):
        par = config.parallel
        tp = par.world_size  # ranks: tensor-parallel shards or pipeline stages
        self._answer = par.answer_rank
        self.timeout_s = par.worker_timeout_s
        threads = config.num_threads or max(1, usable_cores() // tp)  # ranks share the cores, none oversubscribes
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self._procs, self._conns = [], []
        for rank in range(tp):
            ours, theirs = ctx.Pipe()
            spec = WorkerSpec(config, num_blocks, str(device), eos_token_ids, tokenizer, rank, tp, init_method,
                              threads, same_machine=True)
            proc = ctx.Process(target=run_worker, args=(spec, theirs), name=f"flashserve-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._procs.append(proc)
            self._conns.append(ours)
        self._stop = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        self._receive(set(range(tp)), "start-up")
        logger.info("%d tensor-parallel workers up (pids %s), %d threads each", tp,
                    [p.pid for p in self._procs], threads)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def submit(self, sched: SchedulerOutput) -> None:
        self._check_running()
        data = pickle.dumps(sched, protocol=pickle.HIGHEST_PROTOCOL)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(data)
            except OSError:
                self._fail(f"cannot reach tensor-parallel worker {rank}")

    def collect(self) -> RunnerOutput:
        self._check_running()
        return self._receive({self._answer}, "a step")[self._answer]

    def shutdown(self) -> None:
        self._stop()

    def _receive(self, ranks: set[int], what: str) -> dict[int, object]:
        """The payloads of `ranks`' next ("ready" | "ok", payload) messages, failing on any error,
        death or timeout."""
        deadline = time.monotonic() + self.timeout_s
        by_conn = {conn: rank for rank, conn in enumerate(self._conns)}
        sentinels = [p.sentinel for p in self._procs]
        got: dict[int, object] = {}
        while len(got) < len(ranks):
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"tensor-parallel worker(s) {sorted(ranks - set(got))} did not answer within "
                           f"worker_timeout_s={self.timeout_s:g} s during {what} (a worker hung)")
            ready = wait([*by_conn, *sentinels], timeout=left)
            for obj in ready:
                rank = by_conn.get(obj)
                if rank is None:
                    continue  # a sentinel: a process ended; its pipe reports EOF too
                try:
                    kind, payload = obj.recv()
                except (EOFError, OSError):
                    self._fail(f"noticed during {what}")
                if kind == "error":
                    self._fail(f"tensor-parallel worker {rank} failed during {what}:\n{payload}")
                got[rank] = payload
            if any(not p.is_alive() for p in self._procs):
                self._fail(f"noticed during {what}")
        return got

    def _fail(self, what: str) -> None:
        """Stop every worker and raise WorkerError: what happened, and which workers died, how."""
        time.sleep(REPORT_GRACE_S if not any(not p.is_alive() for p in self._procs) else 0.0)
        dead = [f"worker {r} (pid {p.pid}) {_exit_reason(p.exitcode)}" for r, p in enumerate(self._procs)
                if not p.is_alive()]
        self._failure = "; ".join(dead + [what]) if dead else what
        self.shutdown()
        raise WorkerError(f"tensor-parallel inference failed: {self._failure}")


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _stop_workers(procs, conns) -> None:
    """Ask each worker to stop, then terminate and finally kill the ones still there; reap all."""
    stop = pickle.dumps(None)
    for conn in conns:
        try:
            conn.send_bytes(stop)
        except OSError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            proc.join(1.0)
        if proc.is_alive():
            proc.kill()  # also ends a stopped (SIGSTOP) process
            proc.join()
    for conn in conns:
        conn.close()


def _free_port(all_interfaces: bool = False) -> int:
    with socket.socket() as s:
        s.bind(("" if all_interfaces else "127.0.0.1", 0))
        return s.getsockname()[1]
