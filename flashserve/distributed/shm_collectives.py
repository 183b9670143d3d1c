"""All-reduce and all-gather between the ranks of one machine through shared memory, instead of gloo
over loopback TCP (whose every collective costs a round of socket wake-ups, ~0.5 ms however small).

The region, a file in /dev/shm mapped by every rank (rank 0 creates it and removes its name once
all have mapped it, so nothing is left behind):

    flags:  world lines of 64 bytes; line r holds the sequence number of rank r's latest arrival
    slots:  2 buffers x world slots of SLOT_BYTES; a collective with sequence number s uses buffer s % 2

A collective: copy this rank's chunk into its slot of buffer s % 2, announce s, wait until every
rank has (kernels/csrc/shm_barrier.cpp), then read every rank's slot. Two buffers suffice: a rank
writes buffer s % 2 again only at s + 2, after every rank announced s + 1, which each does only
after it finished reading s. Every rank sums the slots in rank order, so all hold the same bits.
Tensors larger than a slot go through in chunks.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

SLOT_BYTES = 1 << 20
FLAG_LINE = 64  # bytes of a rank's flag line: kFlagStride int64s in kernels/csrc/shm_barrier.cpp
SHM_DIR = Path("/dev/shm")


class SharedMemoryCollectives:
    def __init__(self, region: torch.Tensor, rank: int, world_size: int, timeout_s: float, kernels, path: str):
        self.rank, self.world_size, self.timeout_s, self._kernels = rank, world_size, timeout_s, kernels
        self.path = path  # the region's name in SHM_DIR while the ranks mapped it, unlinked since
        self.flags = region[: FLAG_LINE * world_size].view(torch.int64)
        slots = region[FLAG_LINE * world_size:]
        self.slots = [[slots[(b * world_size + r) * SLOT_BYTES:(b * world_size + r + 1) * SLOT_BYTES]
                       for r in range(world_size)] for b in range(2)]
        self.seq = 0

    @classmethod
    def create(cls, rank: int, world_size: int, timeout_s: float, kernels) -> "SharedMemoryCollectives | None":
        """Map one region for the ranks of the default process group (all on this machine). Collective:
        every rank calls it, with this rank's C++ kernels (None when they failed to build). None on
        every rank unless all have the kernels and rank 0 a writable /dev/shm."""
        usable = kernels is not None and (rank != 0 or (SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)))
        agreed = torch.tensor([int(usable)])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if not agreed.item():
            return None
        path = [str(SHM_DIR / f"flashserve-tp-{uuid.uuid4().hex}") if rank == 0 else None]
        if rank == 0:
            open(path[0], "wb").close()
        dist.broadcast_object_list(path, src=0)
        size = FLAG_LINE * world_size + 2 * world_size * SLOT_BYTES
        region = torch.from_file(path[0], shared=True, size=size, dtype=torch.uint8)  # zeros: no rank arrived
        dist.barrier()  # every rank has it mapped: its name can go
        if rank == 0:
            os.unlink(path[0])
        return cls(region, rank, world_size, timeout_s, kernels, path[0])

    def _exchange(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `chunk` (same shape and dtype on all), as views of the region, rank order."""
        self.seq += 1
        buffer = self.slots[self.seq % 2]
        nbytes = chunk.numel() * chunk.element_size()
        buffer[self.rank][:nbytes].view(chunk.dtype).view(chunk.shape).copy_(chunk)
        self._kernels.shm_arrive_and_wait(self.flags, self.rank, self.world_size, self.seq, self.timeout_s)
        return [buffer[r][:nbytes].view(chunk.dtype).view(chunk.shape) for r in range(self.world_size)]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `t` (contiguous), in place, added in rank order."""
        flat = t.view(-1)
        step = SLOT_BYTES // t.element_size()
        for start in range(0, flat.numel(), step):
            out = flat[start:start + step]
            parts = self._exchange(out)
            torch.add(parts[0], parts[1], out=out)
            for p in parts[2:]:
                out.add_(p)
        return t

    @staticmethod
    def gathers(t: torch.Tensor) -> bool:
        """all_gather takes `t`: a matrix whose rows fit a slot."""
        return t.dim() == 2 and t.shape[1] * t.element_size() <= SLOT_BYTES

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (N, n) concatenated along the last dimension: (N, world_size * n); see gathers()."""
        t = t.contiguous()
        rows, n = t.shape
        out = t.new_empty(rows, self.world_size * n)
        step = SLOT_BYTES // (n * t.element_size())
        for start in range(0, rows, step):
            parts = self._exchange(t[start:start + step])
            for r, p in enumerate(parts):
                out[start:start + step, r * n:(r + 1) * n] = p
        return out
