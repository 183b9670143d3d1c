"""int8 KV cache: one side (K or V) of a layer's paged cache stored as int8 with a float32
scale per token and head (symmetric, scale = max|x| / 127), in the spirit of lmdeploy's
online int8 KV quantization. Reads dequantize only the blocks an attention call gathers,
so the attention kernels see the compute dtype and need no int8 variant."""
from __future__ import annotations

import torch

from flashserve.kernels import ops


class Int8KVCache:
    def __init__(self, num_blocks: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        # Not zeroed, like the float caches (runner/kv_cache.py): pages are touched when written,
        # and an unwritten slot's garbage scale (NaN too) never reaches a result.
        self.data = torch.empty((num_blocks, block_size, num_heads, head_dim), dtype=torch.int8, device=device)
        self.scale = torch.empty((num_blocks, block_size, num_heads), dtype=torch.float32, device=device)
        self.dtype = dtype  # what reads return

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def __getitem__(self, index) -> torch.Tensor:
        return (self.data[index].float() * self.scale[index].unsqueeze(-1)).to(self.dtype)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Whole blocks by id, dequantized (the torch.Tensor.index_select call the kernels make)."""
        if dim != 0:
            raise ValueError("an int8 KV cache is gathered by block (dim 0) only")
        return self[index]

    def write(self, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """x: (T, H, D) → slots (T,), quantized per token and head."""
        xf = x.float()
        scale = xf.abs().amax(dim=-1).clamp_min(1e-8) / 127.0  # (T, H)
        q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        self.data.view(-1, *self.data.shape[2:]).index_copy_(0, slot_mapping, q)
        self.scale.view(-1, self.scale.shape[2]).index_copy_(0, slot_mapping, scale)



# One side of a layer's cache is a plain tensor (num_blocks, block_size, heads, head_dim) of a float
# dtype, or an Int8KVCache; the functions below are the only places that tell them apart.
def is_int8(cache) -> bool:
    return isinstance(cache, Int8KVCache)


def write(cache, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """x: (T, H, D) → the cache's slots slot_mapping (T,), in place."""
    if is_int8(cache):
        cache.write(x, slot_mapping)
    else:
        ops.write_kv_slots(x, cache, slot_mapping)


def copy_blocks(src_cache, src: torch.Tensor, dst_cache, dst: torch.Tensor) -> None:
    """Blocks src of src_cache → blocks dst of dst_cache, two caches of one kind (the same one for
    copy-on-write of shared blocks; a KV cache and its swap space, on any devices, for swapping).
    An int8 cache's scales travel with its values."""
    if is_int8(src_cache):
        dst_cache.data[dst] = src_cache.data[src].to(dst_cache.data.device)
        dst_cache.scale[dst] = src_cache.scale[src].to(dst_cache.scale.device)
    else:
        dst_cache[dst] = src_cache[src].to(dst_cache.device)


FLOAT_KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_storage_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The element type of a float KV cache: the one named; for "auto", float16 under float32
    compute (half the bytes every decode step reads, as llama.cpp's default f16 cache; the
    attention kernels widen it in registers), else the compute dtype."""
    if kv_cache_dtype == "auto":
        return torch.float16 if dtype == torch.float32 else dtype
    return FLOAT_KV_DTYPES.get(kv_cache_dtype, dtype)


def kv_bytes_per_token_head(head_dim: int, kv_cache_dtype: str, dtype: torch.dtype) -> int:
    if kv_cache_dtype == "int8":
        return head_dim + 4
    return head_dim * torch.empty((), dtype=kv_storage_dtype(kv_cache_dtype, dtype)).element_size()
