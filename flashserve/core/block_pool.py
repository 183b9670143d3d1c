"""The pool of KV blocks: reference counts, an LRU free list, and the hash → block map.

Block 0 is the padding block that block tables are filled with; it is never handed out.
A freed block keeps its hash (its K/V stay valid) and can be revived by a prefix hit
until allocation reuses it, which evicts the hash: least recently freed first.

The free list hands out, in this order: freed blocks without a hash (most recently freed first:
their pages are written already and nothing is lost by reusing them), then blocks never handed
out, then cached blocks, least recently freed first. So the pool's resident memory grows only
when every written block holds live K/V or a cached prefix (the pool is reserved, not
zero-filled: runner/kv_cache.py).

    free:  [unhashed, newest first] [never used, in id order] [hashed, oldest freed first]
            ^ head: next to reuse                                              tail ^
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from flashserve.core.block_hash import BlockHash


@dataclass(eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    touched: bool = False  # handed out at least once: its K/V pages have been written


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (block 0 is padding)")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # OrderedDict as an O(1) doubly linked list: head = next to reuse.
        self.free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self.cached: dict[BlockHash, KVBlock] = {}
        # Blocks ever handed out: the part of the reserved pool whose memory is in use (never shrinks,
        # the pool keeps its pages); the stats report it next to the reservation.
        self.num_touched = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free)} free")
        out = []
        for _ in range(n):
            _, block = self.free.popitem(last=False)
            if block.block_hash is not None:  # reuse evicts the cached content
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            if not block.touched:
                block.touched = True
                self.num_touched += 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on blocks found by a prefix hit (reviving them if free)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self.free[b.block_id]
            b.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop a reference; blocks reaching 0 join the free list: cached ones at its tail in the
        given order, the others at its head (the next to reuse)."""
        for b in blocks:
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise RuntimeError(f"block {b.block_id} released more often than taken")
            if b.ref_cnt == 0:
                self.free[b.block_id] = b
                if b.block_hash is None:
                    self.free.move_to_end(b.block_id, last=False)

    def cache(self, block: KVBlock, block_hash: BlockHash) -> None:
        if block.block_hash is not None:
            return
        if block_hash not in self.cached:  # a duplicate computed concurrently stays uncached
            self.cached[block_hash] = block
            block.block_hash = block_hash

    def uncache(self, block: KVBlock) -> None:
        """Forget the block's content: a prefix hit must never find it."""
        if block.block_hash is not None and self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash)

    def num_free_excluding(self, blocks: list[KVBlock]) -> int:
        """Free blocks left after reviving `blocks` (those with ref_cnt 0 leave the free list)."""
        return len(self.free) - sum(1 for b in blocks if b.ref_cnt == 0)
