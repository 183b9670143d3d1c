"""The swap space: host-memory slots, each one KV block of every layer, that preempted requests'
blocks are copied to and back from (the bookkeeping is core/swap_space.py's).

Laid out like the KV cache it serves (runner/kv_cache.py): per layer a (K, V) pair of
(slots, block_size, kv_heads, head_dim) tensors of the cache's storage type, int8 values and
their scales for an int8 cache. Reserved, not written: a slot's pages become resident when a
block is first swapped into it. Pinned when the cache sits on a CUDA device, so copies overlap.
"""
from __future__ import annotations

import torch

from flashserve.attention import kv_quant
from flashserve.config import EngineConfig
from flashserve.runner.kv_cache import kv_bytes_per_block


def num_swap_slots(config: EngineConfig) -> int:
    """KV blocks of the whole model that swap_space bytes hold (each rank of a sharded model keeps the
    same number of its smaller blocks, so a slot id means the same everywhere)."""
    per_block = kv_bytes_per_block(config.model_config, config.cache.block_size, getattr(torch, config.dtype),
                                   config.cache.kv_cache_dtype)
    return config.cache.swap_space // per_block


def allocate_swap_space(kv_caches, num_slots: int) -> list:
    """One swap tensor (or Int8KVCache) of num_slots blocks per KV cache tensor, on the host."""
    if num_slots == 0:
        return []
    first = kv_caches[0][0]
    on_cuda = (first.data if kv_quant.is_int8(first) else first).device.type == "cuda"
    swap = []
    for k, v in kv_caches:
        pair = []
        for cache in (k, v):
            if kv_quant.is_int8(cache):
                side = kv_quant.Int8KVCache(num_slots, *cache.shape[1:], cache.dtype, torch.device("cpu"))
                if on_cuda:
                    side.data, side.scale = side.data.pin_memory(), side.scale.pin_memory()
            else:
                side = torch.empty((num_slots, *cache.shape[1:]), dtype=cache.dtype, pin_memory=on_cuda)
            pair.append(side)
        swap.append(tuple(pair))
    return swap


def copy_kv_blocks(src_caches, dst_caches, pairs: list[tuple[int, int]]) -> None:
    """Copy blocks pairs[i][0] of every layer of src_caches to blocks pairs[i][1] of dst_caches."""
    if not pairs:
        return
    src = torch.tensor([s for s, _ in pairs])
    dst = torch.tensor([d for _, d in pairs])
    for src_pair, dst_pair in zip(src_caches, dst_caches):
        for s, d in zip(src_pair, dst_pair):
            kv_quant.copy_blocks(s, src, d, dst)
