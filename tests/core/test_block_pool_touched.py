"""BlockPool.num_touched: the blocks ever handed out, the part of the reserved KV pool that has
been written (the engine reports it in bytes next to the reservation)."""
from __future__ import annotations

from flashserve.core.block_pool import BlockPool


def test_touched_counts_distinct_blocks_ever_handed_out():
    pool = BlockPool(6)  # block 0 is padding: 5 to hand out
    assert pool.num_touched == 0
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [1, 2] and pool.num_touched == 2
    pool.release(a)  # written blocks without a hash are reused before untouched ones
    b = pool.allocate(3)
    assert [x.block_id for x in b] == [2, 1, 3] and pool.num_touched == 3
    pool.release(b)
    b = pool.allocate(5)
    assert [x.block_id for x in b] == [3, 1, 2, 4, 5] and pool.num_touched == 5
    pool.release(b)
    c = pool.allocate(5)  # every block again: nothing new is touched
    assert pool.num_touched == 5 and pool.num_free == 0
    pool.release(c)
    pool.touch([c[0]])  # a prefix hit revives a block, it hands out nothing new
    assert pool.num_touched == 5
