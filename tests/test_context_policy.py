"""Overflow policies: exact truncation, the error message, and summarize end to end on a tiny model."""

import pytest
from conftest import assert_all_blocks_free

from tuneserve import SamplingParams
from tuneserve.overflow.policy import default_reserve, fit_prompt

IDS = list(range(100))


def test_fitting_prompts_are_untouched():
    plan = fit_prompt(IDS, 20, 128, "truncate-left")
    assert plan.ids == IDS and plan.max_tokens == 20 and plan.metadata == {}
    assert fit_prompt(IDS, None, 128, "error").max_tokens == 28


def test_error_states_the_three_numbers():
    with pytest.raises(ValueError, match=r"context length is 64 tokens, but the prompt has 100 tokens and "
                                         r"max_tokens is 10 \(110 in all\)"):
        fit_prompt(IDS, 10, 64, "error")


def test_truncate_left_keeps_the_end():
    plan = fit_prompt(IDS, 10, 64, "truncate-left")
    assert plan.ids == IDS[46:] and plan.max_tokens == 10
    assert plan.metadata == {"overflow_policy": "truncate-left", "original_prompt_tokens": 100,
                             "removed_tokens": 46, "prompt_tokens": 54}


def test_truncate_middle_keeps_head_and_tail():
    plan = fit_prompt(IDS, 10, 64, "truncate-middle")
    assert plan.ids == IDS[:27] + IDS[73:]
    assert plan.metadata["removed_range"] == [27, 73] and plan.metadata["removed_tokens"] == 46


def test_omitted_max_tokens_reserves_room():
    plan = fit_prompt(IDS, None, 64, "truncate-left")
    assert plan.max_tokens == default_reserve(64) == 8 and len(plan.ids) == 56


def test_max_tokens_alone_too_big_is_an_error_whatever_the_policy():
    with pytest.raises(ValueError, match="max_tokens alone leaves no room"):
        fit_prompt(IDS, 63, 64, "truncate-left")


@pytest.mark.parametrize("policy", ["truncate-left", "truncate-middle"])
def test_engine_reports_truncation(make_llm, policy):
    llm = make_llm(max_model_len=64, overflow_policy=policy)
    out = llm.generate(["0123456789" * 10], SamplingParams(max_tokens=10, temperature=0), use_tqdm=False)[0]
    assert out.metadata["overflow_policy"] == policy and out.metadata["original_prompt_tokens"] == 100
    assert len(out.prompt_token_ids) == 54 and len(out.outputs[0].token_ids) <= 10
    assert_all_blocks_free(llm)


def test_summarize_replaces_the_middle(make_llm):
    llm = make_llm(max_model_len=128, overflow_policy="summarize")
    prompt = "The report begins here. " + "filler text about nothing in particular. " * 10 + "Question: why?"
    ids = llm.get_tokenizer()(prompt).input_ids
    out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    meta = out.metadata
    assert meta["overflow_policy"] == "summarize" and meta["original_prompt_tokens"] == len(ids)
    assert "summary" in meta and meta["summary_tokens"] <= meta["summary_budget_tokens"]
    head_len, tail_start = meta["removed_range"]
    assert out.prompt_token_ids[:head_len] == ids[:head_len]
    assert out.prompt_token_ids[-(len(ids) - tail_start):] == ids[tail_start:]
    assert len(out.prompt_token_ids) + 16 <= 128 and len(out.outputs[0].token_ids) == 16
    assert_all_blocks_free(llm)


def test_abort_while_summarizing(make_llm):
    llm = make_llm(max_model_len=128, overflow_policy="summarize")
    eng = llm.llm_engine
    eng.add_request("r", "x" * 300, SamplingParams(max_tokens=16))
    eng.abort_request("r")
    outs = eng.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] and not eng.has_unfinished_requests()
    assert_all_blocks_free(llm)
