"""Paged attention: the portable path and the compiled kernel against a dense reference."""

import math
import sys

import pytest
import torch

from tuneserve.kernels import attention as A

BS, HKV, G, D = 4, 2, 3, 16


def visible(q: int, k: int, window: int, sinks: int) -> bool:
    """The definition, written out here so the kernel's own mask code is not its own oracle: causal; with a
    window, the last `window` positions (the query's own included) plus the first `sinks` positions."""
    return k <= q and (window == 0 or q - k < window or k < sinks)


def dense_reference(q, keys, vals, qpos, window, sinks, scale):
    """q: (L, H, D) at positions qpos; keys/vals: (T, Hkv, D) for positions 0..T-1."""
    allowed = torch.tensor([[visible(int(qp), kp, window, sinks) for kp in range(keys.shape[0])]
                            for qp in qpos])  # (L, T)
    kk = keys.repeat_interleave(G, dim=1).transpose(0, 1)  # (H, T, D)
    vv = vals.repeat_interleave(G, dim=1).transpose(0, 1)
    s = (q.transpose(0, 1) @ kk.transpose(1, 2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return (s.softmax(-1) @ vv).transpose(0, 1)


def test_reference_mask_by_hand():
    """The oracle itself, on one query: window 3 with 2 sinks at position 7 sees 0, 1 and 5, 6, 7."""
    assert [k for k in range(10) if visible(7, k, 3, 2)] == [0, 1, 5, 6, 7]
    assert [k for k in range(10) if visible(7, k, 0, 2)] == list(range(8))


def make_batch(spec, seed=0):
    """spec: list of (start_pos, num_new). Returns q, k, v, caches, seqs and per-seq full K/V."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 1 + sum(math.ceil((s + n) / BS) for s, n in spec)
    kc = torch.zeros(num_blocks, BS, HKV, D)
    vc = torch.zeros(num_blocks, BS, HKV, D)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    seqs, full, qs, ks, vs = [], [], [], [], []
    for start, n in spec:
        nb = math.ceil((start + n) / BS)
        table, perm = perm[:nb], perm[nb:]
        keys = torch.randn(start + n, HKV, D, generator=g)
        vals = torch.randn(start + n, HKV, D, generator=g)
        for p in range(start):  # the already-cached context
            kc[table[p // BS], p % BS], vc[table[p // BS], p % BS] = keys[p], vals[p]
        seqs.append((start, n, table))
        full.append((keys, vals))
        qs.append(torch.randn(n, HKV * G, D, generator=g))
        ks.append(keys[start:])
        vs.append(vals[start:])
    return torch.cat(qs), torch.cat(ks), torch.cat(vs), kc, vc, seqs, full


SPECS = [
    [(9, 1), (0, 1), (30, 1), (15, 1)],  # pure decode
    [(9, 1), (20, 5), (3, 16)],  # decodes, speculative verification, a short prompt tail
    [(0, 20), (7, 1), (12, 24)],  # a fresh prompt, a decode, a long chunk after cached context
    [(40, 18), (2, 1)],  # a long chunk whose window has left the blocks between the sinks and itself
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("window,sinks", [(0, 0), (6, 0), (6, 2), (6, 5)])
@pytest.mark.parametrize("kernel", ["auto", "portable"])
def test_paged_attention_matches_dense(spec, window, sinks, kernel, monkeypatch):
    if kernel == "portable":
        monkeypatch.setattr(A, "short_attention_c_ok", lambda *a: False)
    elif A.libraries.paged_attention() is None:
        pytest.skip("no C compiler here")
    calls = []
    real = A.short_attention_c
    monkeypatch.setattr(A, "short_attention_c", lambda *a: calls.append(1) or real(*a))
    q, k, v, kc, vc, seqs, full = make_batch(spec)
    meta = A.build_metadata(seqs, BS, torch.device("cpu"), window=window, sinks=sinks)
    out = A.paged_attention(q, k, v, kc, vc, meta, scale=0.25)
    row = 0
    for (start, n, _), (keys, vals) in zip(seqs, full):
        ref = dense_reference(q[row:row + n], keys, vals, torch.arange(start, start + n), window, sinks, 0.25)
        torch.testing.assert_close(out[row:row + n], ref, atol=1e-5, rtol=1e-4)
        row += n
    assert bool(calls) == (kernel == "auto")


@pytest.mark.parametrize("d", [16, 64])
def test_compiled_row_is_the_same_alone_and_in_a_batch(d, monkeypatch):
    """Work items are (row, head): a decode row's output bits do not depend on the rows beside it."""
    if A.libraries.paged_attention() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(sys.modules[__name__], "D", d)
    q, k, v, kc, vc, seqs, _ = make_batch([(9, 1), (30, 1), (17, 1)])
    assert q.shape[2] == d and A.short_attention_c_ok(q, kc)
    meta = A.build_metadata(seqs, BS, torch.device("cpu"))
    together = A.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, scale=0.25)
    for i, s in enumerate(seqs):
        alone = A.paged_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], kc.clone(), vc.clone(),
                                  A.build_metadata([s], BS, torch.device("cpu")), scale=0.25)
        assert torch.equal(alone, together[i:i + 1])


def test_compiled_kernel_takes_head_sizes_up_to_its_bound():
    kc = torch.zeros(2, BS, 1, A.MAX_HEAD_DIM + 16)
    assert A.short_attention_c_ok(torch.zeros(1, 300, A.MAX_HEAD_DIM), kc)  # any number of heads
    assert not A.short_attention_c_ok(torch.zeros(1, 2, A.MAX_HEAD_DIM + 16), kc)
