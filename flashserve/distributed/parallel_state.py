"""The tensor-parallel process group: who this rank is and the two collectives the sharded model
needs. Passed to the layers that communicate as an argument (never a global), so a layer can be
built against any group.

gloo on the CPU; NCCL when the model runs on CUDA. When every rank is on this machine's CPU
(worker processes, not Ray actors that may sit on other nodes), the two collectives go through
shared memory instead (shm_collectives.py); gloo still carries the pipeline's send/recv and the
rendezvous. Collectives time out after the engine's worker timeout, so a rank whose peer died or
hangs raises instead of waiting forever.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from flashserve.distributed.shm_collectives import SharedMemoryCollectives


class TPGroup:
    def __init__(self, rank: int, world_size: int, shm: SharedMemoryCollectives | None = None):
        self.rank, self.world_size, self.shm = rank, world_size, shm

    @classmethod
    def join(cls, rank: int, world_size: int, init_method: str, device: torch.device,
             timeout_s: float, same_machine: bool = False) -> "TPGroup":
        """Join the group at `init_method` (tcp://host:port, rendezvous of all ranks). `same_machine`:
        every rank runs on this host, so a CPU group may share memory."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        shm = None
        if same_machine and device.type == "cpu":
            from flashserve.kernels.build import cpu_kernels

            shm = SharedMemoryCollectives.create(rank, world_size, timeout_s, cpu_kernels())
        return cls(rank, world_size, shm)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `t`, in place (t must be contiguous)."""
        if self.shm is not None:
            return self.shm.all_reduce(t)
        dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (..., n) concatenated along the last dimension: (..., world_size * n)."""
        if self.shm is not None and self.shm.gathers(t):
            return self.shm.all_gather(t)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
