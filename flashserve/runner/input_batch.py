"""SchedulerOutput → flat model inputs and AttentionMetadata for one step.

All sequences' new tokens are concatenated on one axis (see attention/metadata.py);
index arithmetic is done in numpy so there is no Python loop over tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flashserve.attention.metadata import AttentionMetadata
from flashserve.core.sched_output import ScheduledRequest


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # (num_tokens,) int64
    positions: torch.Tensor  # (num_tokens,) int64
    attn_metadata: AttentionMetadata
    sample_indices: torch.Tensor  # (num_rows,) rows of the hidden states to turn into logits
    sampled_requests: list[int]  # index into `scheduled` of each sampling request, in row order
    # (its rows: 1, or k + 1 with k drafts to verify: the last k + 1 positions)


def build_model_inputs(scheduled: list[ScheduledRequest], block_size: int, device: torch.device) -> ModelInputs:
    query_lens = [r.num_scheduled_tokens for r in scheduled]
    seq_lens = [r.num_computed_tokens + r.num_scheduled_tokens for r in scheduled]
    cu = np.zeros(len(scheduled) + 1, dtype=np.int64)  # (num_seqs + 1,)
    np.cumsum(query_lens, out=cu[1:])
    num_tokens = int(cu[-1])
    max_blocks = max(len(r.block_ids) for r in scheduled)

    input_ids = np.empty(num_tokens, dtype=np.int64)  # (num_tokens,)
    positions = np.empty(num_tokens, dtype=np.int64)  # (num_tokens,)
    slots = np.empty(num_tokens, dtype=np.int64)  # (num_tokens,)
    block_table = np.zeros((len(scheduled), max_blocks), dtype=np.int32)  # (num_seqs, max_blocks), 0 = pad
    for i, r in enumerate(scheduled):
        start, end = r.num_computed_tokens, r.num_computed_tokens + r.num_scheduled_tokens
        lo, hi = cu[i], cu[i + 1]
        blocks = np.asarray(r.block_ids, dtype=np.int64)
        pos = np.arange(start, end, dtype=np.int64)
        input_ids[lo:hi] = (r.token_ids[start:] + r.spec_token_ids) if r.spec_token_ids else r.token_ids[start:end]
        positions[lo:hi] = pos
        slots[lo:hi] = blocks[pos // block_size] * block_size + pos % block_size
        block_table[i, : len(blocks)] = blocks

    sampled = [i for i, r in enumerate(scheduled) if r.samples_this_step]
    meta = AttentionMetadata(
        query_start_loc=torch.from_numpy(cu.astype(np.int32)).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_table=torch.from_numpy(block_table).to(device),
        slot_mapping=torch.from_numpy(slots).to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return ModelInputs(
        input_ids=torch.from_numpy(input_ids).to(device),
        positions=torch.from_numpy(positions).to(device),
        attn_metadata=meta,
        sample_indices=torch.as_tensor(
            [row for i in sampled for row in range(cu[i + 1] - 1 - len(scheduled[i].spec_token_ids), cu[i + 1])],
            dtype=torch.int64, device=device),
        sampled_requests=sampled,
    )
