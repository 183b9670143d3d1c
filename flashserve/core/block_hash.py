"""Identity of a full KV block for prefix caching: a hash of its tokens chained with its
parent's hash, so equal blocks under different prefixes never match (vLLM's automatic
prefix caching; SGLang's radix tree reaches the same sharing with a trie)."""
from __future__ import annotations

from collections.abc import Sequence

BlockHash = int


def hash_block(parent: BlockHash | None, tokens: Sequence[int], extra_key: object = None) -> BlockHash:
    return hash((parent, tuple(tokens), extra_key))


def extend_block_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int, num_blocks: int,
                        extra_key: object = None) -> list[BlockHash]:
    """Grow `hashes` (the chain of the first full blocks of token_ids) to `num_blocks` entries, in place."""
    while len(hashes) < num_blocks:
        i = len(hashes)
        chunk = token_ids[i * block_size : (i + 1) * block_size]
        if len(chunk) < block_size:
            raise ValueError("only full blocks are hashed")
        hashes.append(hash_block(hashes[-1] if hashes else None, chunk, extra_key))
    return hashes
