"""KV swap: which host-memory swap slots hold the blocks of preempted requests, and when to swap.

Bookkeeping only (slot ids, like block ids): the model runner owns the slot tensors
(runner/kv_swap.py) and copies blocks to and from them as the SchedulerOutput says.

A slot holds one KV block of every layer. A request swapped out keeps its computed tokens: the
first ceil(num_computed / block_size) blocks go to slots, in block-table order, and come back,
into fresh blocks, when it resumes. When the slots run out a victim is recomputed instead, so
nothing is ever lost.

    preempt R (7 computed, block_size 4):  blocks [5, 9]  --swap out-->  slots [0, 1]
    resume R:                              slots [0, 1]   --swap in--->  blocks [2, 7]
                                           (or a prefix hit revives block 5, and only slot 1 copies)

The cost rule ("auto"). Recomputing a token costs about 2 * num_params FLOPs (one matmul per
weight, Kaplan et al. 2020, "Scaling Laws for Neural Language Models", eq. 2.1); swapping its KV
costs 2 copies (out and in) of its kv_bytes_per_token. Both grow with the tokens, so one number
decides: the tokens a swapped block must hold for its copies to cost less than its recompute,

    min_tokens_per_block = (2 * block_bytes / copy_rate) / (2 * num_params / compute_rate).

On this project's CPUs compute_rate / copy_rate is about 60 FLOP per byte (a float32 GEMM at
~140 GFLOP/s on two cores, benchmarks/RESULTS.md, against ~2.3 GB/s measured for gathering 64
float16 blocks of SmolLM2's shape into a swap tensor), which puts the threshold below one token
for every real model (SmolLM2-135M: ~0.2): they always swap while slots last. Only toy models
with much KV per parameter recompute.
"""
from __future__ import annotations

from flashserve.config import ModelConfig

FLOP_PER_COPIED_BYTE = 60.0  # compute_rate / copy_rate of the cost rule above


def min_tokens_per_swapped_block(model: ModelConfig, block_bytes: int) -> float:
    """The cost rule's threshold: swap a victim when its computed tokens per block to copy reach it."""
    return FLOP_PER_COPIED_BYTE * block_bytes / decoder_params(model)


def decoder_params(model: ModelConfig) -> int:
    """Weights a token passes through in the decoder layers (attention projections and the gated FFN)."""
    h, kv = model.hidden_size, model.num_kv_heads * model.head_dim
    attn = 2 * h * model.num_heads * model.head_dim + 2 * h * kv
    return model.num_layers * (attn + 3 * h * model.intermediate_size)


class SwapSpace:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: slot 0 is handed out first
        self.req_slots: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def slots_of(self, request_id: str) -> list[int]:
        return self.req_slots.get(request_id, [])

    def allocate(self, request_id: str, n: int) -> list[int] | None:
        """n slots for the request's blocks, or None (nothing taken) when fewer are free."""
        if n > len(self.free) or request_id in self.req_slots:
            return None
        slots = [self.free.pop() for _ in range(n)]
        self.req_slots[request_id] = slots
        return slots

    def release(self, request_id: str) -> None:
        """Give back the request's slots (if any); idempotent."""
        self.free.extend(reversed(self.req_slots.pop(request_id, [])))
