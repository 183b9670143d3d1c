"""One tensor-parallel rank in its own process: joins the group, loads its part of the model,
then runs every SchedulerOutput the engine sends, in order, until told to stop.

Messages (multiprocessing pipes): engine → worker, the pickled SchedulerOutput of a step (the same
bytes to every rank, pickled once) or None to stop; worker → engine, ("ready", None) after
start-up, ("ok", RunnerOutput) from rank 0 (the last pipeline stage) after each step, ("error", traceback) from any rank
that fails, which then exits. Every rank samples from the same gathered logits; rank 0 answers.
"""
from __future__ import annotations

import pickle
import signal
import traceback
from dataclasses import dataclass

import torch

from flashserve.config import EngineConfig


@dataclass(frozen=True)
class WorkerSpec:
    config: EngineConfig
    num_blocks: int
    device: str
    eos_token_ids: tuple[int, ...]
    tokenizer: object  # the engine's, for guided decoding's grammars (a model file may carry none)
    rank: int
    world_size: int
    init_method: str  # tcp://127.0.0.1:port: where the ranks meet
    num_threads: int  # torch threads of this rank
    same_machine: bool = False  # every rank is a process of this host: collectives may share memory


def run_worker(spec: WorkerSpec, conn) -> None:
    """The worker process's entry point (spawned: a fresh interpreter, so it imports this module)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the engine's to handle: it stops the workers
    group = None
    try:
        group, runner = start_rank(spec)
        conn.send(("ready", None))
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):  # the engine's process is gone
                break
            sched = pickle.loads(data)
            if sched is None:
                break
            out = runner.execute(sched)
            if spec.rank == spec.config.parallel.answer_rank:
                conn.send(("ok", out))
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        if group is not None:
            group.destroy()


def start_rank(spec: WorkerSpec):
    """Join the group and build this rank's runner (its part of the model and of the KV cache)."""
    from flashserve.distributed.rank_runner import build_runner
    from flashserve.distributed.parallel_state import TPGroup
    from flashserve.sample.guided import GuidedDecoding

    torch.set_num_threads(spec.num_threads)
    torch.manual_seed(spec.config.seed)  # as the engine seeds its own process: the same draws
    device = torch.device(spec.device)
    # Collectives wait longer than the engine does, so the engine, which sees every worker, reports a hang.
    group = TPGroup.join(spec.rank, spec.world_size, spec.init_method, device,
                         2 * spec.config.parallel.worker_timeout_s, spec.same_machine)
    guided = GuidedDecoding(spec.tokenizer, spec.eos_token_ids)
    return group, build_runner(spec.config, spec.num_blocks, device, guided, spec.eos_token_ids, group)
