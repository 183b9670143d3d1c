"""Shared-memory collectives (distributed/shm_collectives.py) between spawned processes: every rank
gets the sum (in rank order) and the concatenation of what each rank put in, bit for bit, over
several rounds (both buffers; a tensor larger than a slot goes in chunks), the region leaves no file
behind, and a rank whose peers never arrive raises after the timeout instead of waiting forever."""
from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from flashserve.distributed.multiproc import _free_port
from flashserve.distributed.shm_collectives import SHM_DIR, SLOT_BYTES

SHAPES = [(1, 576), (32, 576), (3, 7), (SLOT_BYTES // 4 + 100,), (5, 24576)]  # the fourth spans two slots
ROUNDS = 3


def inputs(rank: int, round_: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * round_ + 10 * rank + len(shape))
    return torch.randn(shape, generator=g)


def _rank(rank: int, world: int, port: int, out) -> None:
    from flashserve.distributed.parallel_state import TPGroup

    torch.set_num_threads(1)
    group = TPGroup.join(rank, world, f"tcp://127.0.0.1:{port}", torch.device("cpu"), 60, same_machine=True)
    results = []
    for round_ in range(ROUNDS):
        for shape in SHAPES:
            x = inputs(rank, round_, shape)
            results.append(group.all_reduce(x.clone()))
            if len(shape) == 2:
                results.append(group.all_gather(x))
    out.put((rank, group.shm is not None, results, group.shm and group.shm.path))
    if rank == 0:  # one more all-reduce, which no other rank joins
        group.shm.timeout_s = 1.0
        start = time.monotonic()
        try:
            group.all_reduce(torch.ones(4))
        except RuntimeError as exc:
            out.put((str(exc), time.monotonic() - start))
    else:
        time.sleep(60)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_sum_and_the_concatenation(world):
    ctx = multiprocessing.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, out), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got, names = {}, set()
        for _ in range(world):
            rank, shared, results, name = out.get(timeout=120)
            assert shared, "the ranks fell back to gloo"
            got[rank] = results
            names.add(name)
        message, took = out.get(timeout=60)
        assert "did not arrive within" in message and 1.0 <= took < 10
    finally:
        for p in procs:
            p.kill()
            p.join()
    # one region, its name gone from SHM_DIR once mapped (other tests' ranks may hold regions of their own)
    (name,) = names
    assert Path(name).parent == SHM_DIR and not Path(name).exists()
    expected = []
    for round_ in range(ROUNDS):
        for shape in SHAPES:
            xs = [inputs(r, round_, shape) for r in range(world)]
            total = xs[0] + xs[1]
            for x in xs[2:]:
                total = total + x
            expected.append(total)
            if len(shape) == 2:
                expected.append(torch.cat(xs, dim=-1))
    for rank in range(world):
        assert len(got[rank]) == len(expected)
        for a, b in zip(got[rank], expected):
            assert torch.equal(a, b)
