"""The tensor-parallel process group: who this rank is and the two collectives the sharded model
needs. Passed to the layers that communicate as an argument (never a global), so a layer can be
built against any group.

gloo on the CPU; NCCL when the model runs on CUDA. Collectives time out after the engine's
worker timeout, so a rank whose peer died or hangs raises instead of waiting forever.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class TPGroup:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def join(cls, rank: int, world_size: int, init_method: str, device: torch.device,
             timeout_s: float) -> "TPGroup":
        """Join the group at `init_method` (tcp://host:port, rendezvous of all ranks)."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        return cls(rank, world_size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's `t`, in place (t must be contiguous)."""
        dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's (..., n) concatenated along the last dimension: (..., world_size * n)."""
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=-1)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
