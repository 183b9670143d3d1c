"""Block pool and KV cache manager: exact block ids, reference counts, prefix hits, LRU eviction, forks."""
from __future__ import annotations

import pytest

from flashserve.core.block_hash import hash_block
from flashserve.core.block_pool import BlockPool
from flashserve.core.kv_cache_manager import KVCacheManager
from flashserve.core.request import Request
from flashserve.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8))


def admit(kvm: KVCacheManager, r: Request) -> list[int]:
    computed, n = kvm.get_computed_blocks(r)
    ids = kvm.allocate_slots(r, r.num_tokens - n, computed)
    r.num_computed_tokens = r.num_tokens
    return ids


def test_pool_never_hands_out_block_zero_and_reuses_least_recently_freed_cached_blocks_first():
    pool = BlockPool(5)
    a = pool.allocate(4)
    assert [b.block_id for b in a] == [1, 2, 3, 4] and pool.num_free == 0
    for i, b in enumerate(a):  # every block holds a cached prefix
        pool.cache(b, hash_block(None, [i]))
    pool.release([a[2], a[0]])
    assert [b.block_id for b in pool.allocate(2)] == [3, 1]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_pool_reuses_written_uncached_blocks_before_untouched_ones_before_cached_ones():
    """Resident memory follows use: a freed block without a hash is reused (newest first) before
    a block never written; a cached block only when neither is left, so prefixes stay revivable."""
    pool = BlockPool(8)
    a = pool.allocate(4)  # 1 2 3 4
    pool.cache(a[0], hash_block(None, [0]))
    pool.release(a)  # 1 cached -> tail; 2, 3, 4 uncached -> head, 4 freed last
    assert [b.block_id for b in pool.allocate(7)] == [4, 3, 2, 5, 6, 7, 1]
    assert pool.num_touched == 7 and pool.lookup(hash_block(None, [0])) is None  # reusing 1 evicted its prefix


def test_prefix_hit_reuses_exact_blocks_and_leaves_one_token_to_compute():
    kvm = KVCacheManager(16, BS)
    a = req("a", range(10))  # blocks: [0..3] [4..7] [8,9]
    ids_a = admit(kvm, a)
    assert ids_a == [1, 2, 3]
    b = req("b", list(range(8)) + [50, 51, 52])
    computed, n = kvm.get_computed_blocks(b)
    assert [blk.block_id for blk in computed] == [1, 2] and n == 8
    assert kvm.allocate_slots(b, b.num_tokens - n, computed) == [1, 2, 4]
    assert [kvm.pool.blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    # Whole prompt cached: the last block is recomputed so its logits exist.
    c = req("c", range(8))
    _, n = kvm.get_computed_blocks(c)
    assert n == 4
    kvm.check_invariants([a, b])


def test_chained_hash_same_block_under_another_prefix_does_not_hit():
    kvm = KVCacheManager(16, BS)
    admit(kvm, req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    _, n = kvm.get_computed_blocks(req("b", [0, 0, 0, 0, 5, 6, 7, 8, 9]))
    assert n == 0


def test_freed_blocks_stay_cached_until_reused():
    kvm = KVCacheManager(5, BS)  # 4 usable blocks
    a = req("a", range(9))
    admit(kvm, a)
    kvm.free(a)
    assert kvm.num_free_blocks == 4
    b = req("b", range(9))
    computed, n = kvm.get_computed_blocks(b)
    assert n == 8 and kvm.prefix_hits == 8
    kvm.allocate_slots(b, 1, computed)
    kvm.free(b)
    # Filling the pool with other content evicts the cached blocks.
    admit(kvm, req("c", range(100, 116)))
    _, n = kvm.get_computed_blocks(req("d", range(9)))
    assert n == 0


def test_blocks_a_failed_pass_left_unwritten_are_not_found_again():
    """allocate_slots registers the blocks a pass is to fill; the pass raises, the request is freed
    with what was written (the first block): a later request with the same tokens hits that block
    only, never the two whose K/V were never computed."""
    kvm = KVCacheManager(8, BS)
    a = req("a", range(12))
    admit(kvm, a)
    kvm.free(a, num_written=5)  # one whole block and a token of the next
    computed, n = kvm.get_computed_blocks(req("b", range(12)))
    assert n == 4 and len(computed) == 1
    kvm.check_invariants([])


def test_allocation_fails_cleanly_when_short():
    kvm = KVCacheManager(4, BS)  # 3 usable
    a = req("a", range(12))
    assert admit(kvm, a) == [1, 2, 3]
    b = req("b", range(50, 55))
    assert kvm.allocate_slots(b, 5) is None
    kvm.check_invariants([a])
    assert kvm.block_ids("b") == []


def test_fork_shares_blocks_and_copy_on_write_of_the_partial_last_block():
    kvm = KVCacheManager(16, BS)
    parent = req("p", range(6))  # blocks 1 (full), 2 (half)
    admit(kvm, parent)
    child = req("c", range(6))
    child.num_computed_tokens = 6
    kvm.fork(parent, child, 6)
    assert [kvm.pool.blocks[i].ref_cnt for i in (1, 2)] == [2, 2]
    ids = kvm.allocate_slots(child, 1)  # the child writes position 6 into the shared half block
    assert ids == [1, 3]
    assert kvm.take_copies() == [(2, 3)]
    assert [kvm.pool.blocks[i].ref_cnt for i in (1, 2, 3)] == [2, 1, 1]
    kvm.check_invariants([parent, child])
    assert kvm.allocate_slots(parent, 1) == [1, 2]  # the parent is alone on block 2 now: in place
    assert kvm.take_copies() == []


@pytest.mark.parametrize("prompt,copies,table", [
    (8, [(2, 3)], [1, 3]),  # the last token ends a full block: rewriting it keeps tokens 4..6
    (5, [], [1, 3]),  # the last token opens a block: nothing before it to keep
    (1, [], [2]),
])
def test_forked_sample_recomputing_the_last_prompt_token_writes_a_private_block(prompt, copies, table):
    kvm = KVCacheManager(16, BS)
    parent = req("p", range(prompt))
    admit(kvm, parent)
    child = req("c", range(prompt))
    kvm.fork(parent, child, prompt)
    child.num_computed_tokens = prompt - 1
    assert kvm.allocate_slots(child, 1) == table
    assert kvm.take_copies() == copies
    kvm.check_invariants([parent, child])
    assert kvm.pool.blocks[kvm.block_ids("p")[-1]].ref_cnt == 1


def test_fork_shares_only_the_blocks_of_the_given_tokens():
    kvm = KVCacheManager(16, BS)
    parent = req("p", range(6))
    admit(kvm, parent)
    for _ in range(3):
        parent.append_output_token(9)
    assert kvm.allocate_slots(parent, 3) == [1, 2, 3]  # positions 6 to 8
    assert len(kvm.req_hashes["p"]) == 2
    child = req("c", range(6))
    kvm.fork(parent, child, 6)
    assert kvm.block_ids("c") == [1, 2] and kvm.req_hashes["c"] == kvm.req_hashes["p"][:1]


def test_waste_fraction_counts_reserved_but_unused_slots():
    kvm = KVCacheManager(16, BS)
    a = req("a", range(5))  # 2 blocks = 8 slots, 5 used
    admit(kvm, a)
    assert kvm.kv_waste_fraction([a]) == pytest.approx(3 / 8)
