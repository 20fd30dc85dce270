"""Structured output: every constrained output fits its constraint, in batches with unconstrained requests,
with speculation and preemption, and matchers end with their requests."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer

from tuneserve import SamplingParams
from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import ParamError, StructuredOutputsParams
from tuneserve.server.app import ServerSettings

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "ok", "size"],
          "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "size": {"enum": [1, 2, 3]}}}
PROMPTS = ["Give me a color:", "Answer:", "x y z", "The result is"]


def sampled(**so) -> list[SamplingParams]:
    """The same constraint at temperature 1 over many seeds (and one greedy)."""
    s = StructuredOutputsParams(**so)
    return [SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured_outputs=s) for i in range(12)] + \
        [SamplingParams(temperature=0, max_tokens=64, structured_outputs=s)]


def texts(llm, params):
    outs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), [o.outputs[0].finish_reason for o in outs]
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    from tuneserve import LLM

    return LLM(str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES)


def test_json_schema_outputs_are_valid(llm):
    outs = texts(llm, sampled(json=SCHEMA))
    for t in outs:
        jsonschema.validate(json.loads(t), SCHEMA)
    assert len(set(outs)) > 1  # sampling still samples among the allowed outputs


def test_choice_regex_and_grammars(llm):
    assert set(texts(llm, sampled(choice=["alpha", "beta", "gamma"]))) <= {"alpha", "beta", "gamma"}
    assert all(re.fullmatch(r"[0-9]{3}-[a-c]{2}", t) for t in texts(llm, sampled(regex=r"[0-9]{3}-[a-c]{2}")))
    lark = 'start: ("ab" | "cd") "!" NUM\nNUM: /[0-9]{2}/'
    assert all(re.fullmatch(r"(ab|cd)![0-9]{2}", t) for t in texts(llm, sampled(grammar=lark)))
    gbnf = 'root ::= ("yes" | "no") "." [0-9]'  # as llama.cpp users write grammars
    assert all(re.fullmatch(r"(yes|no)\.[0-9]", t) for t in texts(llm, sampled(grammar=gbnf)))


def test_any_json_object_parses(llm):
    params = [SamplingParams(temperature=0, max_tokens=200, structured_outputs=StructuredOutputsParams(
        json_object=True))]
    out = llm.generate(["{"], params, use_tqdm=False)[0].outputs[0]
    assert out.text.startswith("{") and " \n" not in out.text and "  " not in out.text  # no free whitespace
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_constrained_and_free_requests_batch_together(llm):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS, [free] * 4, use_tqdm=False)
    mixed = llm.generate(PROMPTS * 2, [free] * 4 + sampled(json=SCHEMA)[:4], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == [o.outputs[0].token_ids for o in alone]
    for o in mixed[4:]:
        jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)


@pytest.mark.parametrize("engine_args", [
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                            "adaptive": False}},
    {"kv_cache_memory_bytes": 6 * 16 * 512, "max_num_seqs": 4},  # 5 usable blocks: requests preempt each other
])
def test_greedy_constrained_output_is_the_same_with_speculation_and_preemption(make_llm, engine_args):
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(
        regex=r"(ab|ba|c)+d")), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 2
    ref = make_llm().generate(PROMPTS, params, use_tqdm=False)
    llm = make_llm(**engine_args)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_drafts > 0 or stats.num_preemptions > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_drafts_of_constrained_requests_are_checked_against_the_grammar(make_llm, tiny_dirs, method):
    """Constrained requests draft (only what their grammar allows), verify against k + 1 masked rows, and
    keep their greedy and seeded output; what they emit always fits."""
    regex = r"(ab|ba|c)+d"
    so = StructuredOutputsParams(regex=regex)
    params = [SamplingParams(temperature=0, max_tokens=40, structured_outputs=so),
              SamplingParams(temperature=1.0, seed=3, max_tokens=40, structured_outputs=so),
              SamplingParams(temperature=0.7, max_tokens=40, structured_outputs=so)]
    spec = {"method": method, "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}
    if method == "draft":
        spec["model"] = str(tiny_dirs["llama-draft"])
    ref = make_llm().generate(PROMPTS[:3], params, use_tqdm=False)
    llm = make_llm(speculative_config=spec)
    got = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got[:2]] == [o.outputs[0].token_ids for o in ref[:2]]
    assert all(re.fullmatch(regex, o.outputs[0].text) for o in got), [o.outputs[0].text for o in got]
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 0 and stats.spec_num_accepted_tokens > 0


def test_matchers_end_with_their_requests(make_llm):
    llm = make_llm()
    engine = llm.llm_engine
    so = StructuredOutputsParams(regex=r"[a-z]{30}")
    engine.add_request("a", "hi", SamplingParams(max_tokens=30, structured_outputs=so))
    engine.add_request("b", "hi", SamplingParams(max_tokens=30, structured_outputs=so, n=2))
    engine.step()
    live = [engine.requests[r] for r in ("a", "b#0", "b#1")]
    assert all(r.grammar is not None for r in live)
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert all(r.grammar is None for r in live)  # aborted or finished: its matcher is gone


@pytest.mark.parametrize("so,message", [
    ({"json": {"type": "frobnicate"}}, "frobnicate"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "(("}, "regex"),
    ({"grammar": "start: ???"}, "structured_outputs"),
    ({"grammar": "0"}, "structured_outputs"),  # neither Lark nor GBNF
])
def test_unusable_constraints_are_param_errors(llm, so, message):
    with pytest.raises(ParamError, match=message) as e:
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**so)), use_tqdm=False)
    assert e.value.param == "structured_outputs"


def test_an_eos_the_request_does_not_stop_at_leaves_the_grammar_alone(llm):
    """ignore_eos: where the grammar may end, EOS may be drawn and the request goes on within the grammar."""
    so = StructuredOutputsParams(regex="(ab)*")
    eos = llm.llm_engine.config.model.arch.eos_token_ids[0]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=12, ignore_eos=True, structured_outputs=so,
                             logit_bias={eos: 3.0}) for i in range(4)]  # EOS likely wherever it is allowed
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert any(eos in o.outputs[0].token_ids for o in outs)
    for o in outs:
        assert o.error is None and re.fullmatch("(ab)*", o.outputs[0].text)


def test_a_grammar_that_min_tokens_cannot_fit_fails_that_request_alone(llm):
    done = StructuredOutputsParams(grammar='start: ""')  # only EOS, from the start
    bad = SamplingParams(max_tokens=8, min_tokens=1, structured_outputs=done)
    good = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(PROMPTS[:2], [bad, good], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "min_tokens" in outs[0].error.message
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 6


def test_a_vanishing_top_p_keeps_the_most_likely_allowed_token(llm):
    """top_p 5e-324 is a denormal, which the engine's step flushes to zero: the top token must stay."""
    so = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(top_p=5e-324, max_tokens=64, structured_outputs=so),
              SamplingParams(temperature=0, max_tokens=64, structured_outputs=so)]
    a, b = llm.generate(PROMPTS[:1] * 2, params, use_tqdm=False)
    assert a.error is None and a.outputs[0].token_ids == b.outputs[0].token_ids


def test_an_overflowing_repetition_penalty_stays_within_the_grammar(llm):
    so = StructuredOutputsParams(json=SCHEMA)  # a penalty of 1.2e-38 divides positive logits past float32's max
    out = llm.generate(PROMPTS[:1], SamplingParams(repetition_penalty=1.1754943508222875e-38, max_tokens=64, seed=0,
                                                   structured_outputs=so), use_tqdm=False)[0]
    assert out.error is None
    jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


def test_exactly_one_constraint():
    with pytest.raises(ParamError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ParamError, match="exactly one"):
        StructuredOutputsParams()


# ----- through the server, with the official client ----------------------------------------------------
class Answer(pydantic.BaseModel):
    color: Literal["red", "green"]
    ok: bool
    count: int = pydantic.Field(ge=0, le=9)


@pytest.fixture(scope="module")
def client(tiny_dirs):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    s = LiveServer(args, ServerSettings(served_model_name="tiny"))
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
    s.stop()


def test_openai_parse_with_a_pydantic_model(client):
    for seed in range(4):
        r = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "color?"}],
                                          response_format=Answer, seed=seed, temperature=1.0, max_tokens=120)
        assert isinstance(r.choices[0].message.parsed, Answer)


def test_response_format_json_schema_and_structured_outputs(client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=64, temperature=1.0, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.completions.create(model="tiny", prompt="code:", max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", r.choices[0].text)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}})
    assert e.value.body["param"] == "response_format"


def test_bench_offline_measures_the_cost_of_a_schema(llm):
    from tuneserve.bench.offline import run_engine, structure_cost
    from tuneserve.bench.workloads import DEMO_SCHEMA, Workload

    work = Workload([[5, 6, 7], [8, 9]], 24, "tiny")
    free = run_engine(llm, work)
    constrained = run_engine(llm, work, structured=StructuredOutputsParams(json=DEMO_SCHEMA))
    assert free["mask_share"] == 0.0 and 0.0 < constrained["mask_share"] < 1.0
    work = Workload([[5, 6, 7], [8, 9]], 400, "tiny")
    schema, same = structure_cost(llm, work, SCHEMA, temperature=1.0, max_num_seqs=2)
    assert schema["valid"] == 1.0 and same["lengths"] == schema["lengths"] and "texts" not in schema
    assert schema["vs_unconstrained"] == schema["output_tok_s"] / same["output_tok_s"]


def test_bench_offline_validity_only_runs_just_the_constrained_workload(llm):
    from tuneserve.bench.offline import structure_cost
    from tuneserve.bench.workloads import Workload

    work = Workload([[5, 6, 7], [8, 9], [10]], 400, "tiny")
    (row,) = structure_cost(llm, work, SCHEMA, temperature=1.0, max_num_seqs=2, compare=False)
    assert row["valid"] == 1.0 and row["num_valid"] == 3 and "vs_unconstrained" not in row
    assert row["config"] == "max_num_seqs=2 json-schema"


UNENDING = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}  # no finite instance


def test_a_schema_the_grammar_cannot_follow_is_the_requests_400(client):
    """llguidance gives up on it mid-decode ("Too many items"): the schema's fault, a 400, not a 500."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=64, seed=1, temperature=1.0,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": UNENDING}})
    assert "the grammar failed after" in e.value.body["message"]
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert ok.choices[0].finish_reason == "length"  # the server goes on
