"""BlockPool: exact block ids, reference counts and LRU eviction order."""

import pytest

from tuneserve.core.block_pool import NULL_BLOCK_ID, BlockPool, hash_block_tokens


def ids(blocks):
    return [b.block_id for b in blocks]


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert ids(pool.get_new_blocks(3)) == [1, 2, 3]
    assert pool.num_free_blocks == 0
    assert pool.blocks[NULL_BLOCK_ID].ref_cnt == 1


def test_free_queue_is_lru_and_eviction_drops_the_hash():
    pool = BlockPool(6)
    a = pool.get_new_blocks(2)  # 1, 2
    b = pool.get_new_blocks(2)  # 3, 4
    h = hash_block_tokens(None, [1, 2])
    pool.cache_block(a[0], h, (1, 2))
    pool.free_blocks(list(reversed(a)))  # request a frees tail first: 2 then 1
    pool.free_blocks(list(reversed(b)))  # then 4, 3
    assert list(pool.free_queue) == [5, 2, 1, 4, 3]
    assert ids(pool.get_new_blocks(2)) == [5, 2]
    assert pool.get_cached_block(h, (1, 2)) is a[0]  # block 1 still cached while free
    assert ids(pool.get_new_blocks(1)) == [1]  # now evicted
    assert pool.get_cached_block(h, (1, 2)) is None
    assert a[0].block_hash is None


def test_touch_takes_a_free_cached_block_out_of_the_free_queue():
    pool = BlockPool(4)
    (blk,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [7])
    pool.cache_block(blk, h, (7,))
    pool.free_blocks([blk])
    assert blk.ref_cnt == 0 and 1 in pool.free_queue
    pool.touch([blk])
    pool.touch([blk])
    assert blk.ref_cnt == 2 and 1 not in pool.free_queue
    pool.free_blocks([blk])
    assert 1 not in pool.free_queue
    pool.free_blocks([blk])
    assert list(pool.free_queue)[-1] == 1


def test_hash_hit_rechecks_tokens():
    pool = BlockPool(3)
    (blk,) = pool.get_new_blocks(1)
    h = hash_block_tokens(None, [1, 2, 3])
    pool.cache_block(blk, h, (1, 2, 3))
    assert pool.get_cached_block(h, (1, 2, 3)) is blk
    assert pool.get_cached_block(h, (1, 2, 4)) is None  # same hash, other tokens: a miss


def test_hash_chains_the_parent():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(h1, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])


def test_first_cached_copy_wins():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    h = hash_block_tokens(None, [5])
    pool.cache_block(a, h, (5,))
    pool.cache_block(b, h, (5,))
    assert pool.get_cached_block(h, (5,)) is a and b.block_hash is None


def test_caching_disabled_caches_nothing():
    pool = BlockPool(3, enable_caching=False)
    (blk,) = pool.get_new_blocks(1)
    pool.cache_block(blk, b"x" * 16, (1,))
    assert pool.cached == {}


def test_usage():
    pool = BlockPool(5)
    pool.get_new_blocks(2)
    assert pool.usage == 0.5


def test_check_invariants_names_what_broke():
    pool = BlockPool(5)
    a = pool.get_new_blocks(2)  # 1, 2
    pool.cache_block(a[0], hash_block_tokens(None, [1]), (1,))
    pool.check_invariants({1: 1, 2: 1})
    with pytest.raises(AssertionError, match=r"KVBlock\(2, ref=1\) is held by 2 block tables"):
        pool.check_invariants({1: 1, 2: 2})
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_invariants({1: 1})  # block 2 referenced, yet no table holds it
    pool.free_queue[2] = None  # a held block slipped into the free queue
    with pytest.raises(AssertionError, match=r"KVBlock\(2, ref=1\) is in the free queue"):
        pool.check_invariants({1: 1, 2: 1})
    del pool.free_queue[2]
    pool.cached.clear()
    with pytest.raises(AssertionError, match="hash the cached map lacks"):
        pool.check_invariants({1: 1, 2: 1})
    pool.cached[a[0].block_hash] = a[0]
    pool.blocks[NULL_BLOCK_ID].ref_cnt = 0
    with pytest.raises(AssertionError, match="null block lost its pin"):
        pool.check_invariants({1: 1, 2: 1})
