"""Tensor parallelism wrapped around a loaded model, not written into it (the approach of
gpt-fast's tp.py; the split is Megatron-LM's, Shoeybi et al. 2019, §3):

    q|k|v, gate|up   column-parallel: each rank keeps the output rows of its heads / its slice
    o, down          row-parallel: the matching input columns, then one all-reduce of the output
    embedding        vocabulary-parallel: rows outside the rank's slice read as zero, all-reduce
    LM head          vocabulary-parallel: each rank's logits, all-gathered to the whole vocabulary

so a decoder layer costs two all-reduces of a (tokens, hidden) tensor. The model's forward is
unchanged: its modules simply hold fewer heads and rows. Which rank owns what is decided once, in
distributed/partition.py; the slicing of each weight form is distributed/weight_shards.py.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from flashserve.config import ModelConfig
from flashserve.distributed.parallel_state import TPGroup
from flashserve.distributed.partition import RankShard
from flashserve.distributed.weight_shards import cols_of, rows_of, take_rows
from flashserve.model.layers.linear import Linear, MergedLinear


def shard_model(model: nn.Module, shard: RankShard, group: TPGroup) -> ModelConfig:
    """Cut `model` (loaded whole) down to this rank's part, in place, and hook its collectives.
    Returns the rank's ModelConfig (its head counts and intermediate size) for its KV cache."""
    cfg = model.config
    d = cfg.head_dim
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    (q0, q1), (k0, k1), (i0, i1) = shard.q_heads, shard.kv_heads, shard.intermediate
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _keep_parts(attn.qkv_proj, {"q": (q0 * d, q1 * d), "k": (q_size + k0 * d, q_size + k1 * d),
                                    "v": (q_size + kv_size + k0 * d, q_size + kv_size + k1 * d)})
        attn.num_heads, attn.num_kv_heads = shard.num_heads, shard.num_kv_heads
        _row_parallel(attn.o_proj, q0 * d, q1 * d, group)
        n = cfg.intermediate_size
        _keep_parts(mlp.gate_up_proj, {"gate": (i0, i1), "up": (n + i0, n + i1)})
        _row_parallel(mlp.down_proj, i0, i1, group)
    inner = model.model
    inner.embed_tokens = VocabParallelEmbedding(inner.embed_tokens, shard, cfg.vocab_size, group)
    if model.lm_head is not None:
        model.lm_head = VocabParallelHead(model.lm_head, shard, cfg.vocab_size, group)
    return dataclasses.replace(cfg, num_heads=shard.num_heads, num_kv_heads=shard.num_kv_heads,
                               intermediate_size=shard.intermediate_size)


def _keep_rows(m: nn.Module, ranges: list[tuple[int, int]]) -> None:
    """Keep output rows `ranges` of a Linear's or VocabEmbedding's weight, float or packed."""
    if m.qweight is None:
        m.weight = nn.Parameter(take_rows(m.weight.data, ranges), requires_grad=False)
    else:
        m.qweight = rows_of(m.qweight, ranges)


def _keep_linear_rows(m: Linear, ranges: list[tuple[int, int]]) -> None:
    _keep_rows(m, ranges)
    if m.bias is not None:
        m.bias = nn.Parameter(take_rows(m.bias.data, ranges), requires_grad=False)
    m.out_features = sum(b - a for a, b in ranges)


def _keep_parts(m: MergedLinear, ranges: dict[str, tuple[int, int]]) -> None:
    """A merged column-parallel projection keeps one row range per part; its parts shrink with it."""
    _keep_linear_rows(m, list(ranges.values()))
    start = 0
    for part, (a, b) in ranges.items():
        m.part_offsets[part] = (start, b - a)
        start += b - a


def _row_parallel(m: Linear, start: int, stop: int, group: TPGroup) -> None:
    """Keep input columns start:stop; the partial products are summed over ranks after the forward.
    A bias is added once, by rank 0."""
    try:
        if m.qweight is None:
            m.weight = nn.Parameter(m.weight.data[:, start:stop].contiguous(), requires_grad=False)
        else:
            m.qweight = cols_of(m.qweight, start, stop)
    except ValueError as exc:
        raise ValueError(f"cannot split a row-parallel layer at columns {start}:{stop}: {exc}") from None
    m.in_features = stop - start
    if m.bias is not None and group.rank != 0:
        m.bias = None
    m.register_forward_hook(lambda _m, _x, y: group.all_reduce(y.contiguous()))


class VocabParallelEmbedding(nn.Module):
    """The rank's rows [start, stop) of the embedding; a token outside them reads zeros, and the
    all-reduce brings in its row from the rank that has it. Also the tied LM head (attend)."""

    def __init__(self, embedding: nn.Module, shard: RankShard, vocab_size: int, group: TPGroup):
        super().__init__()
        self.start, self.stop = shard.vocab
        self.shard_rows, self.vocab_size, self.group = shard.vocab_shard, vocab_size, group
        _keep_rows(embedding, [shard.vocab])
        embedding.num_embeddings = self.stop - self.start
        self.local = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) → (T, d)."""
        mine = (input_ids >= self.start) & (input_ids < self.stop)
        x = self.local(torch.where(mine, input_ids - self.start, 0))  # (T, d)
        x = x.masked_fill(~mine[:, None], 0.0)
        return self.group.all_reduce(x.contiguous())

    def attend(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d) → (N, vocab)."""
        return _gather_vocab(self.local.attend(hidden), self.shard_rows, self.vocab_size, self.group)


class VocabParallelHead(nn.Module):
    """An untied LM head's rows [start, stop); logits all-gathered to the whole vocabulary."""

    def __init__(self, head: Linear, shard: RankShard, vocab_size: int, group: TPGroup):
        super().__init__()
        self.shard_rows, self.vocab_size, self.group = shard.vocab_shard, vocab_size, group
        _keep_linear_rows(head, [shard.vocab])
        self.local = head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _gather_vocab(self.local(hidden), self.shard_rows, self.vocab_size, self.group)


def _gather_vocab(logits: torch.Tensor, shard_rows: int, vocab_size: int, group: TPGroup) -> torch.Tensor:
    """(N, rows of this rank) → (N, vocab): padded to equal shards for the all-gather (only the last
    rank can be short, and its padding lands past the vocabulary), then trimmed."""
    logits = F.pad(logits, (0, shard_rows - logits.shape[-1]))
    return group.all_gather(logits)[:, :vocab_size]
