"""Paged KV cache tensors: one (K, V) pair of block pools per layer, sized from a byte budget."""
from __future__ import annotations

import logging

import torch

from flashserve.attention.kv_quant import Int8KVCache, kv_bytes_per_token_head, kv_storage_dtype
from flashserve.config import CacheConfig, ModelConfig
from flashserve.kernels import ops

logger = logging.getLogger(__name__)


def kv_bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    per_head = kv_bytes_per_token_head(model.head_dim, kv_cache_dtype, dtype)
    return 2 * model.num_layers * block_size * model.num_kv_heads * per_head


def num_blocks_for_budget(
    model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, max_tokens_needed: int, cap_bytes: int
) -> int:
    """Blocks that fit the budget: the explicit kv_cache_memory, else enough for
    `max_tokens_needed` tokens (every sequence at full context) but at most `cap_bytes`
    and at most kv_cache_fraction of the memory available now."""
    per_block = kv_bytes_per_block(model, cache.block_size, dtype, cache.kv_cache_dtype)
    if cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    else:
        wanted = -(-max_tokens_needed // cache.block_size) * per_block
        budget = min(wanted, cap_bytes, int(cache.kv_cache_fraction * available_memory()))
    blocks = budget // per_block
    if blocks < 2:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds fewer than 2 blocks of {per_block} bytes; raise kv_cache_memory"
        )
    return int(blocks)


def allocate_kv_caches(
    model: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
    kv_cache_dtype: str = "auto",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Reserved but not written: torch.empty leaves the pages untouched, so the OS backs only the
    blocks the engine writes (zeroing a 2 GiB pool cost seconds and made all of it resident).
    Unwritten slots hold garbage, NaN included; no reader lets it into a result: prefill and
    the C++ decode read slots < seq_len only, and the torch decode, which gathers whole blocks,
    zeroes V past each row's length before its probabilities (0 there) multiply it."""
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)  # (blocks, block_size, kv_heads, head_dim)
    if kv_cache_dtype == "int8":
        caches = [(Int8KVCache(*shape, dtype, device), Int8KVCache(*shape, dtype, device))
                  for _ in range(model.num_layers)]
        logger.info("KV cache (int8): %d blocks of %d tokens, %.1f MiB", num_blocks, block_size,
                    2 * model.num_layers * caches[0][0].nbytes / 2**20)
        return caches
    store = kv_storage_dtype(kv_cache_dtype, dtype)
    caches = [(ops.kv_cache_empty(shape, store, device, keys=True), ops.kv_cache_empty(shape, store, device, keys=False))
              for _ in range(model.num_layers)]
    total = 2 * model.num_layers * caches[0][0].nbytes
    logger.info("KV cache (%s): %d blocks of %d tokens, %.1f MiB", str(store).removeprefix("torch."), num_blocks,
                block_size, total / 2**20)
    return caches


def available_memory() -> int:
    """Bytes of RAM available to new allocations (Linux MemAvailable; a large default elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40
