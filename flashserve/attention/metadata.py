"""Attention metadata: built by the model runner once per step, passed to every layer.

The batch is flattened: the new tokens of all sequences are concatenated into one
`num_tokens` axis. Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1];
those rows are the last `query_len_i` positions of a context of `seq_lens[i]` tokens
(the earlier `seq_lens[i] - query_len_i` tokens are already in the paged KV cache).

    KV cache of one layer: k_cache, v_cache   # (num_blocks, block_size, num_kv_heads, head_dim)
    token t of sequence i lives in block block_table[i, t // block_size], offset t % block_size
    slot_mapping[j] = block * block_size + offset for new token j (where its K/V is written)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # (num_seqs + 1,) int32, cumulative query lengths
    seq_lens: torch.Tensor  # (num_seqs,) int32, context length incl. the new tokens
    block_table: torch.Tensor  # (num_seqs, max_blocks_per_seq) int32, padded with 0
    slot_mapping: torch.Tensor  # (num_tokens,) int64
    max_query_len: int
    max_seq_len: int
    # Python-side copies so backends can plan without a host sync.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @cached_property
    def query_start_loc_cpu(self) -> list[int]:
        return [0, *accumulate(self.query_lens_cpu)]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1
