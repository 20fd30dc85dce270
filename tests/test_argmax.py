"""Greedy picks (kernels/argmax_ops.py, csrc/argmax.c): torch.argmax's answer exactly, ties, NaN and -inf
included; the sampler uses it."""

import pytest
import torch

from tuneserve.kernels import libraries
from tuneserve.kernels.argmax_ops import argmax_rows

compiled = pytest.mark.skipif(libraries.argmax() is None, reason="no C compiler here")


def _cases():
    g = torch.Generator().manual_seed(0)
    for r, v in ((1, 1), (3, 5), (2, 16), (4, 17), (3, 33), (5, 1000), (2, 49152)):
        yield torch.randn(r, v, generator=g)
        yield torch.randint(0, 3, (r, v), generator=g).float()  # ties everywhere: the first index wins
        yield torch.full((r, v), float("-inf"))
        if v > 20:
            x = torch.randn(r, v, generator=g)
            x[0, v // 2] = float("nan")  # NaN counts as the largest: its first index
            x[-1, v - 1], x[-1, 3] = float("nan"), float("inf")
            yield x
            y = torch.randn(r, v, generator=g)
            y[:, 7], y[:, v - 2] = 5.0, 5.0  # the same maximum in two lanes / in the tail
            yield y


@compiled
def test_argmax_rows_is_torch_argmax():
    for x in _cases():
        assert torch.equal(argmax_rows(x), x.argmax(-1)), x.shape
        if x.shape[1] > 1:
            view = x[:, 1:]  # rows with a stride wider than their length
            assert torch.equal(argmax_rows(view), view.argmax(-1))


def test_other_inputs_go_to_torch():
    x = torch.randn(4, 40)
    for t in (x.double(), x.t(), x.bfloat16(), x[0]):
        assert torch.equal(argmax_rows(t), t.argmax(-1))


def test_the_sampler_picks_with_it(monkeypatch):
    """Greedy rows and the exponential race both take argmax_rows; what it answers is what is sampled."""
    from tuneserve.sample import sampler
    from tuneserve.sampling_params import SamplingParams

    seen = []
    real = sampler.argmax_rows
    monkeypatch.setattr(sampler, "argmax_rows", lambda x: seen.append(tuple(x.shape)) or real(x))
    logits = torch.randn(2, 50)
    greedy = [sampler.SamplingRow(SamplingParams(temperature=0.0), None, [1], []) for _ in range(2)]
    assert sampler.sample(logits, greedy).tolist() == logits.argmax(-1).tolist() and seen == [(2, 50)]
    seen.clear()
    mixed = [greedy[0], sampler.SamplingRow(SamplingParams(temperature=1.0, seed=3), None, [1], [])]
    drawn = sampler.sample(logits, mixed)
    assert seen == [(2, 50), (2, 50)] and int(drawn[0]) == int(logits[0].argmax())
