"""Which KV blocks each request holds: prefix-cache lookup, slot allocation, forks, freeing.

Returns block ids only; the model runner owns the tensors. Counts prefix-cache
queries and hits in tokens.
"""
from __future__ import annotations

from flashserve.core.block_hash import extend_block_hashes
from flashserve.core.block_pool import BlockPool, KVBlock
from flashserve.core.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_hashes: dict[str, list[int]] = {}  # chained hashes of each request's full blocks
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / (self.pool.num_blocks - 1)

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached run of the request's full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching or request.skip_reading_prefix_cache:
            return [], 0
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size  # the last token must be computed for its logits
        hashes = extend_block_hashes(self.req_hashes.setdefault(request.request_id, []), tokens,
                                     self.block_size, max_blocks)
        hit: list[KVBlock] = []
        for h in hashes[:max_blocks]:
            block = self.pool.lookup(h)
            if block is None:
                break
            hit.append(block)
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(hit) * self.block_size
        return hit, len(hit) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] = ()) -> list[int] | None:
        """Blocks for `num_new_tokens` more tokens after the computed ones; None if the pool is short.

        Copy-on-write: a block this step writes into that another request also holds (a fork)
        is replaced by a private one first; if it holds valid tokens before the write position,
        (src, dst) is queued for the runner to copy before the forward pass.

            forked child, block_size 4, writes position 6:   [0 1 2 3][4 5 6 .]
              shared (ref 2):  block 1 = tokens 0-3,  block 2 = tokens 4-6
              child after:     block 1 (ref 2),       block 3 = copy of block 2, then 6 rewritten
        """
        blocks = self.req_blocks.setdefault(request.request_id, [])
        computed_blocks = list(computed_blocks)
        bs = self.block_size
        start = request.num_computed_tokens + len(computed_blocks) * bs
        end = start + num_new_tokens
        needed = -(-end // bs) - len(blocks) - len(computed_blocks)
        shared = [j for j in range(start // bs, min(len(blocks), -(-end // bs))) if blocks[j].ref_cnt > 1]
        if self.pool.num_free_excluding(computed_blocks) < max(needed, 0) + len(shared):
            if not blocks:
                del self.req_blocks[request.request_id]
            return None
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        for j, fresh in zip(shared, self.pool.allocate(len(shared))):
            if j * bs < start:  # valid tokens before the write position: keep them
                self.pending_copies.append((blocks[j].block_id, fresh.block_id))
            self.pool.release([blocks[j]])
            blocks[j] = fresh
        if needed > 0:
            blocks.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching:  # draft tokens past the known ones are not content yet
            self._cache_full_blocks(request, blocks, min(end, request.num_tokens))
        return [b.block_id for b in blocks]

    def trim(self, request: Request, num_tokens: int) -> list[int]:
        """Release the request's blocks past its first `num_tokens` slots (the KV of rejected draft
        tokens) and return its block ids. Those blocks were allocated for draft positions only, so
        they are private and hold no cached hash.

            block_size 4, 6 tokens kept of 11 written:  [0 1 2 3][4 5 x x][x x x .]
                                                                ^ kept    ^ released
        """
        blocks = self.req_blocks.get(request.request_id, [])
        keep = -(-num_tokens // self.block_size)
        if len(blocks) > keep:
            self.pool.release(list(reversed(blocks[keep:])))
            del blocks[keep:]
        return [b.block_id for b in blocks]

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        """Register blocks that are full once this step has written `num_tokens` tokens."""
        full = num_tokens // self.block_size
        hashes = extend_block_hashes(self.req_hashes.setdefault(request.request_id, []), request.all_token_ids,
                                     self.block_size, full)
        for block, h in zip(blocks[:full], hashes):
            self.pool.cache(block, h)

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """The child takes a reference on the parent's blocks holding its first `num_tokens`
        tokens, the partly filled last one included (n > 1 samples of one prompt)."""
        blocks = self.req_blocks.get(parent.request_id, [])[: -(-num_tokens // self.block_size)]
        self.pool.touch(blocks)
        self.req_blocks[child.request_id] = list(blocks)
        self.req_hashes[child.request_id] = self.req_hashes.get(parent.request_id, [])[: num_tokens // self.block_size]

    def free(self, request: Request, num_written: int | None = None) -> None:
        """`num_written`: tokens whose K/V the forward passes wrote, when fewer than the blocks were
        registered for. allocate_slots registers a block's hash before the pass that fills it, so
        after a pass that failed the blocks from the first one it left unwritten must not stay
        findable: a prefix hit would read uninitialized memory as K/V."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_hashes.pop(request.request_id, None)
        if num_written is not None:
            for b in blocks[num_written // self.block_size:]:
                self.pool.uncache(b)
        # Tail first, so under LRU the end of a sequence is evicted before its shareable prefix.
        self.pool.release(list(reversed(blocks)))

    def take_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def kv_waste_fraction(self, requests) -> float:
        """Reserved-but-unused slots over reserved slots, across the given requests' block tables."""
        reserved = used = 0
        for r in requests:
            n = len(self.req_blocks.get(r.request_id, [])) * self.block_size
            reserved += n
            used += min(r.num_tokens, n)
        return (reserved - used) / reserved if reserved else 0.0

    def check_invariants(self, live_requests=None) -> None:
        """Every block's ref_cnt equals the number of live holders; free list == blocks with ref 0."""
        holders = [0] * self.pool.num_blocks
        live = None if live_requests is None else {r.request_id for r in live_requests}
        for rid, blocks in self.req_blocks.items():
            assert live is None or rid in live, f"blocks held by finished request {rid}"
            for b in blocks:
                holders[b.block_id] += 1
        assert self.pool.blocks[0].ref_cnt == 0 and 0 not in self.pool.free, "padding block 0 was handed out"
        for b in self.pool.blocks[1:]:
            assert b.ref_cnt == holders[b.block_id], f"block {b.block_id}: ref_cnt {b.ref_cnt} != {holders[b.block_id]}"
            assert (b.ref_cnt == 0) == (b.block_id in self.pool.free), f"block {b.block_id} free-list mismatch"
        for h, b in self.pool.cached.items():
            assert b.block_hash == h, f"cache map entry of block {b.block_id} out of date"
