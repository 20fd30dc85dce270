"""Window: the visibility rule, its block arithmetic checked against the rule by brute force, and the
attention mask checked against the rule on every (query, key) pair."""

from __future__ import annotations

import pytest
import torch

from tuneserve.core.kv_layout import KVGroupSpec
from tuneserve.core.window import Window
from tuneserve.kernels import attention as A

BS = 4
WINDOWS = [Window(), Window(1), Window(4), Window(7), Window(8, 2), Window(8, 4), Window(13, 5), Window(5, 9)]


def test_sees_full_attention_is_causal():
    w = Window()
    assert [k for k in range(12) if w.sees(9, k)] == list(range(10))
    assert not w.sees(3, 4)


def test_sees_window_and_sinks():
    assert [k for k in range(12) if Window(4).sees(9, k)] == [6, 7, 8, 9]
    assert [k for k in range(12) if Window(4, 2).sees(9, k)] == [0, 1, 6, 7, 8, 9]
    assert [k for k in range(12) if Window(4, 2).sees(3, k)] == [0, 1, 2, 3]
    assert [k for k in range(12) if Window(1, 1).sees(5, k)] == [0, 5]
    assert not Window(4, 8).sees(5, 6)  # sinks never break causality


def test_block_numbers():
    w = Window(8, 4)
    assert w.sink_blocks(BS) == 1 and Window(8, 5).sink_blocks(BS) == 2 and Window(0, 4).sink_blocks(BS) == 0
    assert [w.first_needed_block(p, BS) for p in (0, 7, 8, 11, 12, 30)] == [0, 0, 0, 1, 1, 5]
    assert w.kept_blocks(30, BS) == (1, 5) and w.kept_blocks(8, BS) == (0, 0)
    assert w.needed_blocks(30, 8, BS) == [0, 5, 6, 7]
    assert Window().needed_blocks(30, 3, BS) == [0, 1, 2]
    # a step of L tokens: ceil((L + 7) / 4) + 1 blocks, plus one sink block
    assert [w.step_blocks(n, BS) for n in (1, 8, 16)] == [4, 6, 8]
    assert w.max_blocks(300, BS, 8) == 6 and w.max_blocks(6, BS, 8) == 2 and Window().max_blocks(30, BS, 1) == 8
    assert w.blocks_per_seq(BS) == 5 and Window(512).blocks_per_seq(16) == 34


def test_negative_sizes_are_rejected():
    with pytest.raises(ValueError):
        Window(-1)


@pytest.mark.parametrize("w", WINDOWS, ids=repr)
def test_needed_blocks_are_exactly_what_later_queries_see(w):
    """Blocks < n that some query at position >= p sees == needed_blocks(p, n)."""
    n = 10
    for p in range(n * BS):
        seen = {k // BS for q in range(p, n * BS) for k in range(q + 1) if w.sees(q, k)}
        assert w.needed_blocks(p, n, BS) == sorted(seen), p


@pytest.mark.parametrize("w", [x for x in WINDOWS if x.size], ids=repr)
@pytest.mark.parametrize("step", [1, 3, 4, 9])
def test_step_blocks_bounds_every_chunk(w, step):
    """While a chunk [c, c + L) runs, a request holds needed_blocks(c) up to its last position's block:
    never more than step_blocks(L), and the bound is reached."""
    worst = 0
    for c in range(60):
        for n in range(1, step + 1):
            last = (c + n - 1) // BS
            worst = max(worst, len(w.needed_blocks(c, last + 1, BS)))
    bound = w.step_blocks(step, BS)
    assert worst <= bound and worst >= bound - 1  # tight up to a sink block the window also covers


def test_group_spec_carries_its_window():
    spec = KVGroupSpec((0, 1), 8, 4)
    assert spec.attn_window == Window(8, 4)
    assert spec.max_blocks_per_request(300, BS, 8) == 6
    assert KVGroupSpec((0,)).attn_window == Window()


@pytest.mark.parametrize("w", WINDOWS, ids=repr)
def test_attention_mask_implements_the_rule(w):
    """kernels/attention._allowed, which builds every mask, agrees with Window.sees on every pair."""
    q, k = torch.arange(40), torch.arange(40)
    mask = A._allowed(q.unsqueeze(-1), k, w.size, w.sinks)
    expect = torch.tensor([[w.sees(i, j) for j in range(40)] for i in range(40)])
    assert torch.equal(mask, expect)
