"""Which slice of each layer a tensor-parallel rank owns (Megatron-LM, Shoeybi et al. 2019, §3):
pure arithmetic on the model's sizes, no torch, so the config can check a layout at start-up.

Attention is split by KV head groups, a group being one KV head and the query heads that read
it, so every rank runs ordinary GQA on its own heads and owns their slice of the paged KV cache:

    9 query heads, 3 KV heads, 2 ranks (SmolLM2-135M):   rank 0: KV 0-1, q 0-5;  rank 1: KV 2, q 6-8
    14 query heads, 2 KV heads, 4 ranks:                 error (7 query heads per KV head do not halve)
    4 query heads, 1 KV head, 2 ranks (MQA):             both ranks keep KV head 0 (replicated), q 0-1 | 2-3

When there are fewer KV heads than ranks, each KV head is replicated on tp / num_kv_heads ranks,
which split its query heads. Groups that do not divide evenly go one more to the first ranks:
the result is exact, the work uneven. The MLP's intermediate dimension is split in units of 256
values when it can be (a K-quant's super-block), else 32 (a GGUF block), so a row-parallel down
projection's input splits on the packed weight's group boundaries. The vocabulary is split in
equal shards of ceil(vocab / tp) rows; the last may be shorter, and its logits are padded for the
all-gather and trimmed after.
"""
from __future__ import annotations

from dataclasses import dataclass

from flashserve.config import ModelConfig

SPLIT_UNITS = (256, 32, 1)  # values per unit of an intermediate split, preferred first


@dataclass(frozen=True)
class RankShard:
    """Half-open [start, stop) ranges of one rank."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_shard: int  # rows every rank's vocabulary slice is padded to for the all-gather

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]


def tp_shards(cfg: ModelConfig, tp: int) -> list[RankShard]:
    """One RankShard per rank; ValueError naming the size that does not split."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    heads = _head_ranges(cfg.num_heads, cfg.num_kv_heads, tp)
    inter = _unit_ranges(cfg.intermediate_size, tp)
    shard = -(-cfg.vocab_size // tp)
    vocab = [(r * shard, min(cfg.vocab_size, (r + 1) * shard)) for r in range(tp)]
    return [RankShard(q, kv, i, v, shard) for (q, kv), i, v in zip(heads, inter, vocab)]


def _head_ranges(nq: int, nkv: int, tp: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    group = nq // nkv  # query heads per KV head
    if nkv >= tp:
        counts = even_split(nkv, tp)
        starts = [sum(counts[:r]) for r in range(tp)]
        return [((s * group, (s + c) * group), (s, s + c)) for s, c in zip(starts, counts)]
    if tp % nkv:
        raise ValueError(f"tensor_parallel_size={tp} must divide or be a multiple of the model's {nkv} KV heads")
    sharing = tp // nkv  # ranks that replicate one KV head
    if group % sharing:
        raise ValueError(f"tensor_parallel_size={tp}: the {group} query heads of each of the model's {nkv} KV heads "
                         f"do not split over the {sharing} ranks that share it")
    per = group // sharing
    return [((r * per, (r + 1) * per), (r // sharing, r // sharing + 1)) for r in range(tp)]


def _unit_ranges(size: int, tp: int) -> list[tuple[int, int]]:
    unit = next((u for u in SPLIT_UNITS if size % u == 0 and size // u >= tp), None)
    if unit is None:
        raise ValueError(f"tensor_parallel_size={tp} exceeds the model's intermediate size {size}")
    counts = even_split(size // unit, tp)
    starts = [sum(counts[:r]) * unit for r in range(tp)]
    return [(s, s + c * unit) for s, c in zip(starts, counts)]


def even_split(n: int, parts: int) -> list[int]:
    """n split into `parts` counts differing by at most one, larger first."""
    base, extra = divmod(n, parts)
    return [base + (r < extra) for r in range(parts)]
