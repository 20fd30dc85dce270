"""Failure isolation in the engine (tuneserve/engine/isolation.py), driven by injected faults (tuneserve/faults.py).

A fault pinned to one request ends that request in error; the others' greedy tokens equal a clean run,
every block is free afterwards, the error is counted by kind, and the engine serves again. A failed
forward fails the step's requests, resets the engine and keeps the requests that were not in the step.
"""

from __future__ import annotations

import pytest
from conftest import assert_all_blocks_free

from tuneserve import SamplingParams, faults
from tuneserve.errors import EngineFatalError
from tuneserve.faults import Fault

PROMPTS = {
    "a": "one two three one two three one two three one two",
    "b": "The quick brown fox jumps over the lazy dog and the lazy dog sleeps",
    "victim": "abc abc abc abc abc abc abc abc abc abc abc abc",
    "d": "Continuous batching lets requests join and leave between steps.",
}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}


def run(llm, params=GREEDY, prompts=PROMPTS):
    """Final outputs of named requests run together on the engine."""
    eng = llm.llm_engine
    for rid, text in prompts.items():
        eng.add_request(rid, text, params)
    done = {}
    while eng.has_unfinished_requests():
        for ro in eng.step():
            if ro.finished:
                done[ro.request_id] = ro
    return done


def tokens(outs):
    return {rid: o.outputs[0].token_ids for rid, o in outs.items()}


# point -> (engine args, sampling params for the victim's batch, the kind the error is counted under)
CASES = {
    "prepare": ({}, GREEDY, "prepare"),
    "sample": ({}, GREEDY, "sample"),
    "verify": ({"speculative_config": NGRAM}, GREEDY, "verify"),
    "prompt_logprobs": ({}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=2),
                        "sample"),
    "detokenize": ({}, GREEDY, "detokenize"),
    "stop_check": ({}, GREEDY, "stop_check"),
}


# prompt logprobs are computed while the prompt runs: only the first step reaches them
@pytest.mark.parametrize("point,at", [(p, at) for p in CASES for at in (0, 2) if not (p == "prompt_logprobs" and at)])
def test_a_fault_pinned_to_one_request_ends_only_that_request(make_llm, point, at):
    args, params, kind = CASES[point]
    llm = make_llm(max_num_batched_tokens=64, **args)
    with faults.inject(Fault(point, "victim", at=at)) as inj:
        failed = run(llm, params)
    assert inj.raised and {rid for _, rid in inj.raised} == {"victim"}
    clean = run(llm, params)
    v = failed.pop("victim")
    assert v.finished and v.outputs[0].finish_reason == "error" and v.error is not None
    assert v.error.kind == kind and v.error.status == 500 and "InjectedFault" in v.error.message
    assert tokens(failed) == {rid: t for rid, t in tokens(clean).items() if rid != "victim"}
    assert all(o.outputs[0].finish_reason == "length" for o in clean.values())
    eng = llm.llm_engine
    assert eng.get_stats().errors == {kind: 1}
    assert eng.get_stats().finished["error"] == 1
    assert_all_blocks_free(llm)
    assert not eng.requests and not eng.output.parents and not eng.scheduler.requests


def test_a_failed_sample_fails_all_n_samples_and_only_them(make_llm):
    llm = make_llm()
    n3 = SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)
    eng = llm.llm_engine
    eng.add_request("many", "sampled request", n3)
    eng.add_request("other", PROMPTS["b"], GREEDY)
    done = {}
    with faults.inject(Fault("sample", "many#1", at=2)):
        while eng.has_unfinished_requests():
            done.update({ro.request_id: ro for ro in eng.step() if ro.finished})
    assert [c.finish_reason for c in done["many"].outputs] == ["error"] * 3
    assert done["other"].outputs[0].token_ids == run(llm, prompts={"b": PROMPTS["b"]})["b"].outputs[0].token_ids
    assert_all_blocks_free(llm)


def test_a_failed_forward_resets_the_engine_and_keeps_the_waiting_requests(make_llm):
    llm = make_llm(max_num_seqs=2)
    clean = run(llm)
    eng = llm.llm_engine
    with faults.inject(Fault("forward", at=1)):  # the second step: "a" and "b" run, the rest wait
        failed = run(llm)
    assert {rid for rid, o in failed.items() if o.outputs[0].finish_reason == "error"} == {"a", "b"}
    assert failed["a"].error.kind == "step" and "reset" in failed["a"].error.message
    assert tokens({k: failed[k] for k in ("victim", "d")}) == tokens({k: clean[k] for k in ("victim", "d")})
    assert eng.get_stats().errors == {"step": 1}
    assert_all_blocks_free(llm)
    assert not eng.scheduler.requests and not eng.scheduler.waiting and not eng.scheduler.running
    assert tokens(run(llm)) == tokens(clean)  # and it serves again


def test_a_failed_reset_is_fatal(make_llm):
    llm = make_llm()
    eng = llm.llm_engine
    eng.add_request("a", PROMPTS["a"], GREEDY)
    with faults.inject(Fault("forward"), Fault("reset")), pytest.raises(EngineFatalError, match="reset"):
        eng.step()


def test_a_failed_proposal_drops_the_drafts_and_goes_on(make_llm):
    llm = make_llm(speculative_config=NGRAM)
    clean = run(llm)
    with faults.inject(Fault("propose", at=2, times=3)):
        failed = run(llm)
    assert tokens(failed) == tokens(clean)
    assert llm.llm_engine.get_stats().errors == {"propose": 3}
    assert_all_blocks_free(llm)


def test_a_fault_for_any_request_sticks_to_the_first_it_hits(make_llm):
    llm = make_llm()
    with faults.inject(Fault("sample", at=5)) as inj:
        failed = run(llm)
    errored = [rid for rid, o in failed.items() if o.outputs[0].finish_reason == "error"]
    assert len(errored) == 1 and inj.victims[0] == errored[0]


def test_generate_leaves_nothing_queued_when_a_prompt_is_bad(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(ValueError, match="context length"):
        llm.generate(["fine", "x" * 400], GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert_all_blocks_free(llm)
    assert llm.generate(["fine"], GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"


def test_summarize_refuses_at_admission_what_the_kv_cache_cannot_hold(make_llm):
    # 32 blocks of 16 tokens hold 496 tokens; the context is 1024: the request after the summary never fits
    llm = make_llm(overflow_policy="summarize", max_model_len=1024, kv_cache_memory_bytes=32 * 8192)
    with pytest.raises(ValueError, match="KV cache"):
        llm.generate(["word " * 1500], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_delta_outputs_add_up_to_the_final_output(make_llm):
    llm = make_llm()
    eng = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1, stop=["zzz"])
    full = run(llm, params, {"x": PROMPTS["b"]})["x"].outputs[0]
    prep = eng.prepare_request("y", PROMPTS["b"], params)
    prep.parent.output_kind = "delta"
    eng.submit(prep)
    text, ids, lps = "", [], []
    while eng.has_unfinished_requests():
        for ro in eng.step():
            c = ro.outputs[0]
            text, ids, lps = text + c.text, ids + c.token_ids, lps + c.logprobs
    assert (text, ids, [t.token_id for t in lps]) == (full.text, full.token_ids, [t.token_id for t in full.logprobs])
    assert abs(c.cumulative_logprob - sum(t.logprob for t in lps)) < 1e-9


def test_a_step_leaves_the_callers_floating_point_environment_as_it_was(make_llm):
    import numpy as np

    def subnormals_kept() -> bool:
        return bool(np.float32(np.finfo(np.float32).tiny) / np.float32(4) != 0)

    llm = make_llm()
    assert subnormals_kept()
    llm.generate(["x"], GREEDY, use_tqdm=False)  # steps flush denormals inside, and only there
    assert subnormals_kept()
