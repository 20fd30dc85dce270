"""A request's seed gives the same tokens whatever else is in the batch, with speculation on or off.

Seeded sampling draws each output position's noise from (seed, position) alone, and seeded drafts are
verified by coupling (sample/rejection.py verify_coupled): the emitted tokens are the ones sampling without
drafts draws, so neither the batch, nor which rows the adaptive controller lets draft, nor preemption
change them. The statistical tests check that coupling still samples the target's distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_KV_BYTES

from tuneserve import LLM, SamplingParams
from tuneserve.sample.rejection import verify_coupled
from tuneserve.sample.sampler import position_generator

PROMPTS = ["abc abc abc abc abc abc abc", "one two one two one two one two", "The cat sat. The cat sat. The cat"]
SEEDED = [SamplingParams(temperature=0.8, top_p=0.95, seed=s, max_tokens=28, ignore_eos=True) for s in (1, 2, 3)]
OTHERS = [  # batch companions: unseeded, seeded with other settings (two children), greedy
    ("hello world", SamplingParams(temperature=0.8, max_tokens=28, ignore_eos=True)),
    ("xyzxyzxyzxyzxyz", SamplingParams(temperature=1.0, top_k=20, n=2, seed=7, max_tokens=20, ignore_eos=True)),
    ("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)),
    ("def f(x): return x", SamplingParams(temperature=1.0, presence_penalty=0.5, max_tokens=24, ignore_eos=True)),
]
SPECS = {
    "ngram-adaptive": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1},
    "ngram-pinned": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False},
    "draft-adaptive": {"method": "draft", "num_speculative_tokens": 4},
}


def seeded_outputs(llm: LLM, batch: bool, alone: tuple[int, ...] = (0, 1, 2)) -> list[list[int]]:
    """Token ids of the SEEDED requests, each run alone (those in `alone`) or in one batch with the others
    (then also of the seeded companion's two children)."""
    if not batch:
        return [llm.generate([PROMPTS[i]], SEEDED[i], use_tqdm=False)[0].outputs[0].token_ids for i in alone]
    prompts = PROMPTS + [p for p, _ in OTHERS]
    params = SEEDED + [s for _, s in OTHERS]
    order = [3, 0, 4, 1, 5, 2, 6]  # seeded rows sit between the others
    outs = llm.generate([prompts[i] for i in order], [params[i] for i in order], use_tqdm=False)
    by_index = dict(zip(order, outs))
    return [by_index[i].outputs[0].token_ids for i in range(3)] + [c.token_ids for c in by_index[4].outputs]


def make(tiny_dirs, spec_name: str | None, **kw) -> LLM:
    spec = SPECS[spec_name] if spec_name else None
    if spec and spec["method"] == "draft":
        spec = {**spec, "model": str(tiny_dirs["llama-draft"])}
    kw.setdefault("kv_cache_memory_bytes", TINY_KV_BYTES)
    return LLM(str(tiny_dirs["llama"]), speculative_config=spec, **kw)


@pytest.fixture(scope="module")
def reference(tiny_dirs) -> dict[str, list[list[int]]]:
    """Speculation off: each seeded request alone, and the batch."""
    llm = make(tiny_dirs, None)
    return {"alone": seeded_outputs(llm, batch=False), "batch": seeded_outputs(llm, batch=True)}


def test_without_speculation_the_batch_does_not_change_seeded_tokens(reference):
    assert reference["batch"][:3] == reference["alone"]
    assert all(len(t) == 28 for t in reference["alone"])
    assert reference["batch"][3] != reference["batch"][4]  # the two children have seeds of their own


@pytest.mark.parametrize("which, spec_name", list(enumerate(SPECS)))
def test_speculation_does_not_change_seeded_tokens(tiny_dirs, reference, which, spec_name):
    llm = make(tiny_dirs, spec_name)
    assert seeded_outputs(llm, batch=False, alone=(which,)) == [reference["alone"][which]]  # one, to stay fast
    assert seeded_outputs(llm, batch=True) == reference["batch"]
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 0  # speculation ran for some rows (not for all, when adaptive)


@pytest.mark.parametrize("spec_name", [None, "ngram-pinned", "draft-adaptive"])
def test_preemption_does_not_change_seeded_tokens(tiny_dirs, reference, spec_name):
    llm = make(tiny_dirs, spec_name, kv_cache_memory_bytes=16 * 8192)  # 15 usable blocks of 16 tokens
    assert seeded_outputs(llm, batch=True) == reference["batch"]
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert spec_name is None or llm.llm_engine.get_stats().spec_num_draft_tokens > 0


def test_a_draft_equal_to_the_target_is_accepted_for_seeded_requests(tiny_dirs):
    """The draft races its distribution with the target's noise: when q == p it draws the target's token.
    (Drafting with independent noise would be accepted about sum(p^2) of the time.)"""
    spec = {"method": "draft", "model": str(tiny_dirs["llama"]), "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(str(tiny_dirs["llama"]), speculative_config=spec, kv_cache_memory_bytes=TINY_KV_BYTES)
    llm.generate(PROMPTS, SEEDED, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 50
    # the draft's one-row forwards round differently from the target's verification: allow a rare flip
    assert stats.spec_num_accepted_tokens >= 0.97 * stats.spec_num_draft_tokens


# ----- coupled verification samples the target's distribution -------------------------------------

P = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
Q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])
CHI2_3DOF_P001 = 16.27
CHI2_15DOF_P001 = 37.70


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    exp = probs * counts.sum()
    return float(((counts - exp) ** 2 / exp).sum())


def noise_rows(seed: int, positions: list[int]) -> torch.Tensor:
    return torch.stack([torch.empty(P.shape[1]).exponential_(generator=position_generator(seed, j))
                        for j in positions])


def coupled_draws(positions: list[int], trials: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counts of the first and second emitted tokens, and of the (first, second) pairs that sampling without
    drafts draws, over many seeds. Drafts are adversarial: drawn from Q, which favours what P does not.
    Each round also checks exactness: the emitted tokens are those that sampling without drafts draws."""
    g = torch.Generator().manual_seed(0)
    first, second, pairs = torch.zeros(4), torch.zeros(4), torch.zeros(4, 4)
    for seed in range(trials):
        drafts = [int(torch.multinomial(Q[i], 1, generator=g)) for i in range(2)]
        noise = noise_rows(seed, positions)
        out, accepted = verify_coupled(P, drafts, noise)
        plain = (P / noise).argmax(-1).tolist()  # no drafts: one token per position
        assert out == plain[:len(out)] and out[:accepted] == drafts[:accepted] and len(out) == accepted + 1
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        pairs[plain[0], plain[1]] += 1
    return first, second, pairs


def test_coupled_verification_reproduces_the_target_distribution():
    first, second, pairs = coupled_draws([5, 6, 7], trials=8000)
    assert chi2(first, P[0]) < CHI2_3DOF_P001
    assert chi2(second, P[1]) < CHI2_3DOF_P001  # emitted after an accepted draft: still p_2
    # positions are independent: the pair (first, second) is distributed as p_1 x p_2
    assert chi2(pairs.flatten(), torch.outer(P[0], P[1]).flatten()) < CHI2_15DOF_P001


def test_the_same_test_catches_noise_shared_between_positions():
    """A plausible bug: every position of a step drawing the same noise row."""
    _, _, pairs = coupled_draws([5, 5, 5], trials=2000)
    assert chi2(pairs.flatten(), torch.outer(P[0], P[1]).flatten()) > 10 * CHI2_15DOF_P001


def test_position_generators_differ_by_seed_and_position():
    rows = [noise_rows(s, [j])[0] for s, j in [(1, 0), (1, 1), (2, 0), (0, 1), (-1, 0)]]
    assert all(not torch.equal(a, b) for i, a in enumerate(rows) for b in rows[i + 1:])
    assert torch.equal(noise_rows(1, [1])[0], rows[1])  # and are a function of (seed, position) only
