"""Speculative decoding: n-gram lookup, rejection sampling (statistically), the adaptive controller,
and greedy equality with speculation on and off inside continuous batching."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_all_blocks_free
from tiny_models import build_tiny

from tuneserve import SamplingParams
from tuneserve.sample.rejection import rejection_sample, verify_greedy
from tuneserve.speculative.adaptive import KController
from tuneserve.speculative.ngram import propose_ngram


def test_ngram_takes_the_latest_longest_match():
    assert propose_ngram([1, 2, 3, 4, 1, 2], 3, 1, 3) == [3, 4, 1]
    assert propose_ngram([5, 6, 9, 5, 6, 7, 8, 5, 6], 2, 1, 2) == [7, 8]  # the latest "5 6"
    assert propose_ngram([1, 2, 3], 3, 1, 3) == []
    assert propose_ngram([7, 1, 9, 1], 4, 1, 3) == [9, 1]  # continuation shorter than k
    assert propose_ngram([4, 4], 2, 2, 3) == []  # a tail of 2 needs an earlier pair


def test_verify_greedy():
    assert verify_greedy([5, 6, 7, 8], [5, 6, 7]) == ([5, 6, 7, 8], 3)
    assert verify_greedy([5, 9, 7, 8], [5, 6, 7]) == ([5, 9], 1)
    assert verify_greedy([1, 2], [3]) == ([1], 0)


P = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
Q = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]])


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    exp = probs * n
    return float(((counts - exp) ** 2 / exp).sum())


def draw_outputs(sampler, trials=20000, seed=0):
    """First and second emitted tokens over many rounds, drafts drawn from Q (as a draft model would)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(4)
    second = torch.zeros(4)
    for _ in range(trials):
        drafts = [int(torch.multinomial(Q[i], 1, generator=g)) for i in range(2)]
        out, _ = sampler(P, drafts, Q, g)
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
    return first, second


CHI2_3DOF_P001 = 16.27


def test_rejection_sampling_reproduces_the_target_distribution():
    first, second = draw_outputs(rejection_sample)
    assert chi2(first, P[0]) < CHI2_3DOF_P001
    assert chi2(second, P[1]) < CHI2_3DOF_P001  # the second token is p_2 whatever the first was


def wrong_sampler(p, drafts, q, g):
    """A plausible bug: accept with probability p(d) (ignoring q) and recover from p itself."""
    out = []
    for i, d in enumerate(drafts):
        if float(torch.rand(1, generator=g)) < float(p[i, d]):
            out.append(d)
        else:
            out.append(int(torch.multinomial(p[i], 1, generator=g)))
            return out, i
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=g)))
    return out, len(drafts)


def test_the_same_test_catches_a_wrong_acceptance_rule():
    first, _ = draw_outputs(wrong_sampler)
    assert chi2(first, P[0]) > 10 * CHI2_3DOF_P001


def test_one_hot_drafts_reproduce_the_target():
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(20000):
        out, _ = rejection_sample(P, [3, 0], None, g)
        counts[out[0]] += 1
    assert chi2(counts, P[0]) < CHI2_3DOF_P001


def test_controller_turns_speculation_off_when_verification_is_compute_bound():
    ctl = KController(4)
    ctl.stats.reached = [100] * 4
    ctl.stats.accepted = [60] * 4
    ctl.stats.proposals = ctl.stats.hits = 100
    for n in (1, 8, 32, 128, 512):
        ctl.target.observe(n, 0.01 + 0.002 * n)  # time grows linearly with tokens
    assert ctl.choose(batch=32, base_tokens=32) == 0
    flat = KController(4)
    flat.stats = ctl.stats
    for n in (1, 8, 32, 128, 512):
        flat.target.observe(n, 0.02)  # memory-bound: extra tokens are free
    assert flat.choose(batch=1, base_tokens=1) == 4
    assert KController(3, adaptive=False).choose(batch=64, base_tokens=64) == 3



def test_controller_explores_before_trusting_its_prior_and_probes_while_off():
    from tuneserve.speculative.adaptive import EXPLORE_POSITIONS, PROBE_EVERY, PROBE_REQUESTS

    ctl = KController(4)
    for n in (1, 8, 32):
        ctl.target.observe(n, 0.1)  # a weight-bound target: 0.1 s a step
    ctl.draft_per_position.observe(1, 0.07)  # a draft whose cost the 0.6 prior acceptance does not repay
    assert ctl.choose(batch=1, base_tokens=1) == 0
    # exploring: the full k for at most PROBE_REQUESTS requests until enough drafts are verified
    assert ctl.plan(batch=8, base_tokens=8) == (4, PROBE_REQUESTS)
    for _ in range(EXPLORE_POSITIONS - 1):
        ctl.stats.record(4, 4)
    assert ctl.plan(batch=1, base_tokens=1) == (4, 1)
    ctl.stats.record(4, 4)  # measured: every draft accepted, so the draft pays after all
    assert ctl.plan(batch=1, base_tokens=1) == (2, 1)  # E(k) / (0.1 + 0.07 k) is largest at k = 2
    # a workload where nothing is accepted: off, with a probe every PROBE_EVERY steps
    off = KController(4)
    off.target.points, off.draft_per_position.points = ctl.target.points, ctl.draft_per_position.points
    for _ in range(EXPLORE_POSITIONS):
        off.stats.record(4, 0)
    plans = [off.plan(batch=32, base_tokens=32) for _ in range(2 * PROBE_EVERY)]
    probes = [i for i, p in enumerate(plans) if p != (0, 0)]
    assert probes == [PROBE_EVERY - 1, 2 * PROBE_EVERY - 1]
    assert plans[probes[0]] == (4, PROBE_REQUESTS)
    assert KController(3, adaptive=False).plan(batch=64, base_tokens=64) == (3, 64)


def test_acceptance_counts_fade():
    from tuneserve.speculative.adaptive import DECAY_AT

    ctl = KController(2)
    for _ in range(DECAY_AT):
        ctl.stats.record(2, 2)
    assert ctl.stats.reached == [DECAY_AT, DECAY_AT]
    ctl.stats.record(2, 0)
    assert ctl.stats.reached == [DECAY_AT // 2 + 1, DECAY_AT // 2]
    assert ctl.stats.accepted == [DECAY_AT // 2, DECAY_AT // 2]


REPETITIVE = ["abc abc abc abc abc abc abc", "one two one two one two one two", "xyzxyzxyzxyzxyz",
              "The cat sat. The cat sat. The cat sat. The cat", "hello world"]


def generate(make_llm, params, **kw):
    llm = make_llm(**kw)
    outs = llm.generate(REPETITIVE, params, use_tqdm=False)
    return llm, [o.outputs[0] for o in outs]


@pytest.mark.parametrize("spec", [
    {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False},
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "adaptive": True},
    {"method": "draft", "num_speculative_tokens": 3, "adaptive": False},
    {"method": "draft", "quantization": "int4", "num_speculative_tokens": 3, "adaptive": False},  # self-draft
])
def test_greedy_with_speculation_equals_without(make_llm, tiny_dirs, spec):
    if spec["method"] == "draft" and "quantization" not in spec:
        spec = {**spec, "model": str(tiny_dirs["llama-draft"])}
    common = dict(max_num_batched_tokens=24)  # chunked prefill mixes with speculative decodes
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),  # ends inside an accepted run
              SamplingParams(temperature=0, max_tokens=40, stop=["ab"], ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30),  # may stop at EOS
              SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)]
    _, ref = generate(make_llm, params, **common)
    llm, got = generate(make_llm, params, speculative_config=spec, **common)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert [o.text for o in got] == [o.text for o in ref]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in ref]
    stats = llm.llm_engine.get_stats()
    if not spec["adaptive"]:  # pinned k: speculation surely ran, and some drafts were right
        assert stats.spec_num_drafts > 0 and stats.spec_num_accepted_tokens > 0
    assert_all_blocks_free(llm)
    if llm.llm_engine.spec.draft is not None:
        pool = llm.llm_engine.spec.draft.kv.pools[0]
        assert pool.num_free_blocks == pool.num_blocks - 1


def test_request_metrics_report_acceptance(make_llm):
    llm = make_llm(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
                                       "adaptive": False})
    out = llm.generate([REPETITIVE[0]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert m.spec_num_drafts > 0 and 0 <= m.spec_acceptance_rate <= 1
    assert m.spec_mean_acceptance_length == 1 + m.spec_num_accepted_tokens / m.spec_num_drafts
    assert sum(m.spec_accepted_per_pos[:1]) <= m.spec_num_drafts


def test_sampling_with_speculation_runs_and_is_seeded(make_llm):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    p = SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=25, ignore_eos=True)
    a = make_llm(speculative_config=spec).generate(REPETITIVE, p, use_tqdm=False)
    b = make_llm(speculative_config=spec).generate(REPETITIVE[:2], p, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a[:2]] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 25 for o in a)


def test_aborts_mid_speculation_free_every_block(make_llm, tiny_dirs):
    spec = {"method": "draft", "model": str(tiny_dirs["llama-draft"]), "num_speculative_tokens": 4,
            "adaptive": False}
    llm = make_llm(speculative_config=spec)
    eng = llm.llm_engine
    for i, p in enumerate(REPETITIVE):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    for _ in range(6):
        eng.step()
    assert any(r.spec_token_ids for r in eng.scheduler.running)
    eng.abort_request([str(i) for i in range(len(REPETITIVE))])
    eng.step()
    assert_all_blocks_free(llm)
    pool = eng.spec.draft.kv.pools[0]
    assert pool.num_free_blocks == pool.num_blocks - 1


def test_draft_with_another_tokenizer_is_rejected(make_llm, tmp_path):
    other = build_tiny(tmp_path / "other", "llama", extra_tokens=["<odd>"])
    with pytest.raises(ValueError, match="different tokenizer"):
        make_llm(speculative_config={"method": "draft", "model": str(other), "num_speculative_tokens": 2})


def test_bad_speculative_config_is_rejected(make_llm):
    with pytest.raises(ValueError, match="method must be 'ngram' or 'draft'"):
        make_llm(speculative_config={"method": "medusa"})
    with pytest.raises(ValueError, match="unknown keys"):
        make_llm(speculative_config={"method": "ngram", "k": 3})
    with pytest.raises(ValueError, match="needs \"model\""):
        make_llm(speculative_config={"method": "draft"})


def test_bench_spec_runs_rounds_and_writes_json(tiny_llama, tmp_path):
    import argparse
    import json

    from tuneserve.bench import spec as bench_spec

    p = argparse.ArgumentParser()
    bench_spec.add_parser(p.add_subparsers())
    out = tmp_path / "spec.json"
    ns = p.parse_args(["spec", str(tiny_llama), "--workloads", "open", "--batch-sizes", "1,2", "--output-len", "12",
                       "--min-requests", "3", "--kv-cache-memory-bytes", str(256 * 8192), "--json", str(out),
                       "--spec", '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, '
                                 '"adaptive": false}'])
    assert ns.bench_main(ns) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["batch"], r["requests"]) for r in rows] == [(1, 3), (2, 2)]  # rounds of small batches
    assert all(r["same_tokens"] for r in rows)  # greedy: speculation changes no token
    assert all(0 <= r["acceptance_rate"] <= 1 and 0 < r["mean_k"] <= 3 for r in rows)  # k pinned at 3


def test_a_real_step_replaces_the_calibration_seed_of_its_bucket():
    from tuneserve.speculative.adaptive import CostTable

    t = CostTable()
    t.observe(128, 0.1, seed=True)
    t.observe(200, 0.4)  # the first real step in the bucket [128, 256) replaces the seed
    assert t.points[7] == [200.0, 0.4]
    t.observe(200, 0.2)  # later ones average in
    assert t.points[7] == [200.0, pytest.approx(0.36)]
