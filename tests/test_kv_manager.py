"""KVManager: allocation, prefix-cache hits, freeing, sliding-window drops; exact block ids."""

import pytest

from tuneserve.core.kv_layout import KVGroupSpec
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request
from tuneserve.sampling_params import SamplingParams

BS = 4


def make_kv(num_blocks=10, caching=True, window=0, sinks=0):
    return KVManager([KVGroupSpec(tuple(range(2)), window, sinks)], [num_blocks], BS, caching)


def req(rid, tokens, **kw):
    return Request(rid, tokens, SamplingParams(max_tokens=8, **kw))


def compute(kv, r, n, hits=None):
    """Allocate and pretend the runner computed n more tokens (as the scheduler + update do)."""
    assert kv.allocate_slots(r, n, hits)
    if hits:
        r.num_computed_tokens += len(hits[0]) * BS
    r.num_computed_tokens += n
    kv.cache_blocks(r)
    kv.remove_skipped_blocks(r)
    kv.check_invariants()


def test_allocate_exact_blocks():
    kv = make_kv()
    r = req("a", list(range(10)))
    compute(kv, r, 10)
    assert kv.block_ids(r) == ([1, 2, 3],)
    assert kv.num_free_blocks() == 6
    r.all_token_ids += [10, 11]  # two decode tokens fit in block 3
    compute(kv, r, 2)
    assert kv.block_ids(r) == ([1, 2, 3],)
    r.all_token_ids.append(12)
    compute(kv, r, 1)
    assert kv.block_ids(r) == ([1, 2, 3, 4],)


def test_allocation_failure_changes_nothing():
    kv = make_kv(num_blocks=4)
    r = req("a", list(range(20)))
    assert not kv.allocate_slots(r, 20)
    assert kv.block_ids(r) == ([],) and kv.num_free_blocks() == 3


def test_prefix_hit_shares_full_blocks_and_leaves_the_last_token():
    kv = make_kv()
    a = req("a", list(range(9)))
    compute(kv, a, 9)  # blocks 1, 2 full and cached; block 3 partial
    b = req("b", list(range(8)) + [99])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in hits[0]] == [1, 2]
    compute(kv, b, 1, hits)
    assert kv.block_ids(b) == ([1, 2, 4],)
    assert [kv.pools[0].blocks[i].ref_cnt for i in (1, 2, 3, 4)] == [2, 2, 1, 1]
    # a prompt that is exactly the cached blocks still recomputes its last token
    c = req("c", list(range(8)))
    hits, n = kv.get_computed_blocks(c)
    assert n == 4 and [x.block_id for x in hits[0]] == [1]


def test_prefix_hit_after_free_and_eviction_order():
    kv = make_kv(num_blocks=6)  # 5 usable
    a = req("a", list(range(8)))
    compute(kv, a, 8)
    kv.free(a)
    assert list(kv.pools[0].free_queue) == [3, 4, 5, 2, 1]  # tail block 2 before head block 1
    b = req("b", list(range(8)) + [42])
    hits, n = kv.get_computed_blocks(b)
    assert n == 8 and [x.block_id for x in hits[0]] == [1, 2]
    compute(kv, b, 1, hits)
    assert kv.block_ids(b) == ([1, 2, 3],)
    kv.free(b)
    # filling the cache evicts in LRU order: 4, 5 first, then 3, then 2 (the chain's tail), then 1
    c = req("c", [100 + i for i in range(17)])
    compute(kv, c, 17)
    assert kv.block_ids(c) == ([4, 5, 3, 2, 1],)
    d = req("d", list(range(8)) + [1])
    assert kv.get_computed_blocks(d)[1] == 0


def test_no_prefix_caching():
    kv = make_kv(caching=False)
    a = req("a", list(range(9)))
    compute(kv, a, 9)
    assert kv.get_computed_blocks(req("b", list(range(9))))[1] == 0


def test_prompt_logprobs_requests_skip_the_cache():
    kv = make_kv()
    compute(kv, req("a", list(range(9))), 9)
    assert kv.get_computed_blocks(req("b", list(range(9)), prompt_logprobs=1))[1] == 0


def test_counters_record_admitted_lookups():
    kv = make_kv()
    kv.record_prefix_lookup(9, 8)
    assert (kv.prefix_queries, kv.prefix_hits) == (9, 8)


def test_free_returns_everything():
    kv = make_kv()
    rs = [req(str(i), list(range(i * 3, i * 3 + 6))) for i in range(3)]
    for r in rs:
        compute(kv, r, 6)
    for r in rs:
        kv.free(r)
    pool = kv.pools[0]
    assert pool.num_free_blocks == pool.num_blocks - 1
    assert all(b.ref_cnt == 0 for b in pool.blocks[1:])


def test_sliding_window_drops_blocks_out_of_the_window():
    kv = make_kv(num_blocks=20, window=8)
    r = req("a", list(range(6)))
    compute(kv, r, 6)
    for t in range(6, 30):
        r.all_token_ids.append(t)
        compute(kv, r, 1)
        held = kv.num_held_blocks(r)
        assert held <= 8 // BS + 1, (t, kv.block_ids(r))
    table = kv.block_ids(r)[0]
    # position 30 (the next query) sees (22, 30]: blocks 5..7 are needed, 0..4 are the null block
    assert table[:5] == [0] * 5 and 0 not in table[5:]
    kv.free(r)
    assert kv.num_free_blocks() == 19


def test_sliding_window_keeps_sink_blocks():
    kv = make_kv(num_blocks=20, window=8, sinks=4)
    r = req("a", list(range(30)))
    compute(kv, r, 30)
    table = kv.block_ids(r)[0]
    assert table[0] != 0 and table[1:5] == [0] * 4


@pytest.mark.parametrize("tokens,fits", [(36, True), (37, False)])
def test_can_ever_fit(tokens, fits):
    kv = make_kv(num_blocks=10)  # 9 usable blocks of 4 = 36 tokens
    assert kv.can_ever_fit(tokens) is fits


def test_a_block_only_hits_after_the_same_prefix():
    kv = make_kv()
    P, X, Y, Q = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3], [4, 4, 4, 4]
    compute(kv, req("a", P + Y + [0]), 9)
    compute(kv, req("b", X + Q + [0]), 9)
    hits, n = kv.get_computed_blocks(req("c", X + Y + [0]))
    assert n == 4  # X hits; Y was cached after P, not after X: its KV differs


def test_check_invariants_catches_broken_tables():
    kv = make_kv(num_blocks=20, window=8, sinks=4)
    r = req("a", list(range(30)))
    compute(kv, r, 30)  # table [1, 0, 0, 0, 0, 6, 7, 8]
    kv.check_invariants()
    r.num_computed_tokens = 40  # computed tokens beyond the table
    with pytest.raises(AssertionError, match=r"request 'a' group 0: 8 blocks for 40 computed tokens"):
        kv.check_invariants()
    r.num_computed_tokens = 32  # block 5 (tokens 20-23) left the window (25..32) but was not dropped
    with pytest.raises(AssertionError, match=r"request 'a' group 0: block 5 is KVBlock\(6"):
        kv.check_invariants()
    r.num_computed_tokens = 30
    table = kv.req_blocks[0]["a"]
    table[1] = table[6]  # a block held twice by one request
    with pytest.raises(AssertionError, match="appears twice"):
        kv.check_invariants()


def test_check_invariants_catches_a_mismatched_cached_block():
    kv = make_kv()
    a = req("a", list(range(9)))
    compute(kv, a, 9)
    a.block_hashes[1] = b"x" * 16  # the table's block 1 carries another prefix's hash
    with pytest.raises(AssertionError, match="cached under another prefix's hash"):
        kv.check_invariants()
