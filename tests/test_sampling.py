"""SamplingParams validation and the batched sampler's behaviour."""

import math

import pytest
import torch

from tuneserve.sample.sampler import SamplingRow, apply_penalties, processed_probs, sample, token_logprobs
from tuneserve.sampling_params import SamplingParams

INVALID = [
    ("n", 0), ("n", 129), ("temperature", -0.1), ("temperature", 101), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("min_p", -0.1), ("min_p", 1.1), ("presence_penalty", 2.5), ("frequency_penalty", -3),
    ("repetition_penalty", 0.0), ("repetition_penalty", 3.0), ("max_tokens", 0), ("min_tokens", -1),
    ("logprobs", 21), ("prompt_logprobs", -1), ("stop", ""), ("stop", [""]), ("stop_token_ids", [-1]),
    ("seed", 1.5),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_params_name_the_field_and_range(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*got"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_valid_defaults_and_normalisation():
    p = SamplingParams(stop="END", top_k=-1)
    assert p.stop_strings == ("END",) and p.top_k == 0 and not p.greedy
    assert SamplingParams(temperature=0).greedy


def rows(n, **kw):
    return [SamplingRow(SamplingParams(**kw), None, [], []) for _ in range(n)]


LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def draw_counts(params: dict, n=4000, logits=LOGITS):
    torch.manual_seed(0)
    toks = sample(logits.repeat(n, 1), rows(n, **params))
    return torch.bincount(toks, minlength=logits.numel()).tolist()


def test_sampling_follows_the_distribution():
    counts = draw_counts({"temperature": 1.0})
    expected = [0.5, 0.3, 0.15, 0.05]
    chi2 = sum((c - 4000 * p) ** 2 / (4000 * p) for c, p in zip(counts, expected))
    assert chi2 < 16.27  # chi-square, 3 dof, p = 0.001


def test_top_k_restricts_the_support():
    counts = draw_counts({"temperature": 1.0, "top_k": 2})
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0


def test_top_p_restricts_the_support():
    counts = draw_counts({"temperature": 1.0, "top_p": 0.7})
    assert counts[2] == counts[3] == 0 and min(counts[:2]) > 0


def test_min_p_restricts_the_support():
    counts = draw_counts({"temperature": 1.0, "min_p": 0.2})
    assert counts[3] == 0 and counts[2] > 0


def test_processed_probs_values():
    p = processed_probs(LOGITS.repeat(1, 1), rows(1, temperature=1.0, top_p=0.7))[0]
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    p = processed_probs(LOGITS.repeat(1, 1), rows(1, temperature=0.5))[0]
    sq = torch.tensor([0.25, 0.09, 0.0225, 0.0025])
    assert torch.allclose(p, sq / sq.sum(), atol=1e-6)


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    mixed = [SamplingRow(SamplingParams(temperature=0), None, [], []),
             SamplingRow(SamplingParams(temperature=1.0), None, [], [])]
    for _ in range(20):
        assert int(sample(logits, mixed)[0]) == 1


def test_seeded_rows_use_their_own_generator():
    def one(seed, batch_extra):
        g = torch.Generator().manual_seed(seed)
        rs = [SamplingRow(SamplingParams(temperature=1.0, seed=seed), g, [], [])]
        rs += rows(batch_extra, temperature=1.0)
        logits = torch.zeros(1 + batch_extra, 1000)
        return [int(sample(logits, rs)[0]) for _ in range(8)]

    assert one(5, 0) == one(5, 7) == one(5, 3)
    assert one(5, 0) != one(6, 0)


def test_penalties_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    r = SamplingRow(SamplingParams(repetition_penalty=2.0), None, prompt_ids=[0], output_ids=[1])
    out = apply_penalties(logits.clone(), [r])
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    r = SamplingRow(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), None, [3], [2, 2, 0])
    out = apply_penalties(logits.clone(), [r])
    assert out.tolist() == [[2.0 - 0.75, -1.0, 0.5 - 1.25, 1.0]]


def test_a_vanishing_repetition_penalty_keeps_banned_tokens_banned():
    """5e-324 is 0 in fp32: -inf * 0 would be NaN, and a grammar's masked token would be drawn (fuzz found it)."""
    logits = torch.tensor([[float("-inf"), 1.0, -2.0, float("-inf")]])
    r = SamplingRow(SamplingParams(repetition_penalty=5e-324, top_k=1), None, prompt_ids=[0, 1, 2], output_ids=[3])
    out = apply_penalties(logits.clone(), [r])
    assert out[0, 0] == out[0, 3] == float("-inf") and not out.isnan().any()
    assert int(sample(out, [r])[0]) == 1


def test_min_tokens_bans_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    r = SamplingRow(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[2]), None, [], [7], eos_ids=(1,))
    assert int(sample(logits, [r])[0]) == 3


def test_token_logprobs_rank_and_top():
    lp = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), -1)
    (t,) = token_logprobs(lp, torch.tensor([2]), [2])
    assert t.token_id == 2 and t.rank == 2 and [i for i, _ in t.top] == [1, 2]
    assert math.isclose(t.logprob, float(lp[0, 2]), rel_tol=1e-6)


def test_sampled_rows_share_the_logits_only_where_nothing_masks_them():
    """The runner samples from the head's rows without a copy where they are all of them in order; a grammar
    masks its rows in place, so then (and for a subset) the rows are a copy and the logits, which the logprobs
    are taken from, stay as the model gave them."""
    from tuneserve.worker.model_runner import _rows_of

    logits = torch.randn(3, 10)
    assert _rows_of(logits, [0, 1, 2], masked=False) is logits
    for rows, masked in (([0, 1, 2], True), ([0, 2], False), ([2, 1, 0], False)):
        picked = _rows_of(logits, rows, masked)
        assert torch.equal(picked, logits[rows])
        picked.fill_(float("-inf"))
        assert torch.isfinite(logits).all()
