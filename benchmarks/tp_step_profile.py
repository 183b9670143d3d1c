"""Where a tensor-parallel decode step's time goes: the model runner of one process (2 threads,
module path) and of two ranks (1 thread each) run the same 48 decode steps of SmolLM2-135M, the
ranks timing their collectives (61 all-reduces and one logits all-gather a step), over gloo and
through shared memory (what worker processes use), and the one process with 1 thread too.

    python benchmarks/tp_step_profile.py [sequences]
"""
import multiprocessing
import sys
import time

import torch

BLOCK, STEPS, SEQS = 16, 48, int(sys.argv[1]) if len(sys.argv) > 1 else 1

def steps():
    from flashserve.core.sched_output import SchedulerOutput, ScheduledRequest
    from flashserve.sampling_params import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=STEPS)
    toks = [[(7 * i + j) % 1000 + 10 for j in range(16)] for i in range(SEQS)]
    blocks = [list(range(1 + i * 6, 7 + i * 6)) for i in range(SEQS)]
    yield SchedulerOutput([ScheduledRequest(str(i), toks[i], 0, 16, blocks[i], sp, []) for i in range(SEQS)])
    for s in range(STEPS):
        for t in toks:
            t.append(5)
        yield SchedulerOutput([ScheduledRequest(str(i), toks[i], len(toks[i]) - 1, 1, blocks[i], sp, [5] * (s + 1))
                               for i in range(SEQS)])

def rank_main(rank, world, port, path, out, shared=False, threads=2):
    from flashserve.config import CacheConfig
    from flashserve.distributed.parallel_state import TPGroup
    from flashserve.distributed.partition import tp_shards
    from flashserve.distributed.tensor_parallel import shard_model
    from flashserve.model.loader import load_model
    from flashserve.runner.kv_cache import allocate_kv_caches
    from flashserve.runner.model_runner import ModelRunner
    from flashserve.sample.guided import GuidedDecoding
    torch.set_num_threads(1 if world > 1 else threads)
    comm = [0.0, 0]
    model, cfg = load_model(path, quantization="auto")
    if world > 1:
        group = TPGroup.join(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 60, same_machine=shared)
        for name in ("all_reduce", "all_gather"):
            f = getattr(TPGroup, name)
            def timed(self, t, f=f):
                t0 = time.perf_counter(); r = f(self, t); comm[0] += time.perf_counter() - t0; comm[1] += 1; return r
            setattr(TPGroup, name, timed)
        cfg = shard_model(model, tp_shards(cfg, world)[rank], group)
    caches = allocate_kv_caches(cfg, 8 + 6 * SEQS, BLOCK, torch.float32, torch.device("cpu"), "auto")
    runner = ModelRunner(model, caches, BLOCK, (2,), torch.device("cpu"), GuidedDecoding(None, (2,)),
                         use_decode_plan=False)
    it = steps()
    runner.execute(next(it))
    comm[:] = [0.0, 0]
    t0 = time.perf_counter()
    for s in it:
        runner.execute(s)
    total = time.perf_counter() - t0
    out.put((rank, total / STEPS * 1e3, comm[0] / STEPS * 1e3, comm[1] / STEPS))

if __name__ == "__main__":
    from flashserve.distributed.multiproc import _free_port
    from flashserve.model.catalogue import fetch

    path = str(fetch("smollm2-135m"))
    ctx = multiprocessing.get_context("spawn")
    runs = [("1 process, 2 threads", 1, False, 2), ("1 process, 1 thread", 1, False, 1),
            ("2 ranks, gloo", 2, False, 1), ("2 ranks, shared memory", 2, True, 1)]
    for name, world, shared, threads in runs:
        q, port = ctx.Queue(), _free_port()
        ps = [ctx.Process(target=rank_main, args=(r, world, port, path, q, shared, threads)) for r in range(world)]
        [p.start() for p in ps]
        res = sorted(q.get(timeout=300) for _ in ps)
        [p.join() for p in ps]
        for r, step, c, n in res:
            print(f"{name}, rank {r}: {step:.1f} ms/step, collectives {c:.2f} ms in {n:.0f} calls ({SEQS} seqs)")
