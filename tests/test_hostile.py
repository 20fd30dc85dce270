"""Hostile request bodies: every field at and just past its limits, wrong types, huge and empty values,
NaN/inf, lone surrogates, out-of-vocabulary ids, oversized logit_bias, unsupported features. Each is
refused with a 4xx whose `param` names the field (or served, at the limit), and a normal request is served
right after each. Also: logit_bias works (+100 forces a token, -100 bans one) and SamplingParams refuses
the same values offline."""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
import torch
from conftest import TINY_KV_BYTES
from server_utils import LiveServer

from tuneserve.engine_args import EngineArgs
from tuneserve.sample.sampler import SamplingRow, apply_penalties, sample
from tuneserve.sampling_params import SamplingParams
from tuneserve.server.app import ServerSettings
from tuneserve.server.limits import RequestLimits

MODEL = "tiny"
VOCAB = 272  # tests/tiny_models.py
LIMITS = RequestLimits(max_n=4, max_prompts=4, max_prompt_chars=200, max_messages=4, max_stop=4, max_stop_chars=16,
                       max_stop_token_ids=8, max_logit_bias=8)
BASE = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
NAN, INF = float("nan"), float("inf")
OK = (200, None)


def bias(n: int) -> dict:
    return {str(t): 1 for t in range(n)}


def msgs(*contents) -> list[dict]:
    return [{"role": "user", "content": c} for c in contents]


# (name, completion body fields, expected status, expected param): "-" as a value removes the field
COMPLETIONS = [
    ("seed int64 max", {"seed": 2**63 - 1}, *OK), ("seed int64 min", {"seed": -(2**63)}, *OK),
    ("seed past int64", {"seed": 2**63}, 400, "seed"), ("seed below int64", {"seed": -(2**63) - 1}, 400, "seed"),
    ("seed 2**64+1", {"seed": 18446744073709551617}, 400, "seed"), ("seed string", {"seed": "5"}, 400, "seed"),
    ("seed fraction", {"seed": 1.5}, 400, "seed"), ("seed bool", {"seed": True}, 400, "seed"),
    ("top_k vocab", {"top_k": VOCAB}, *OK), ("top_k past vocab", {"top_k": VOCAB + 1}, 400, "top_k"),
    ("top_k 2**63", {"top_k": 9223372036854775808}, 400, "top_k"), ("top_k -1", {"top_k": -1}, *OK),
    ("top_k -2", {"top_k": -2}, 400, "top_k"),
    ("n at limit", {"n": 4}, *OK), ("n past limit", {"n": 5}, 400, "n"), ("n 0", {"n": 0}, 400, "n"),
    ("n huge", {"n": 10**30}, 400, "n"), ("n float 2.0", {"n": 2.0}, *OK), ("n null", {"n": None}, 400, "n"),
    ("logprobs 20", {"logprobs": 20}, *OK), ("logprobs 21", {"logprobs": 21}, 400, "logprobs"),
    ("logprobs -1", {"logprobs": -1}, 400, "logprobs"),
    ("temperature NaN", {"temperature": NAN}, 400, "temperature"),
    ("temperature inf", {"temperature": INF}, 400, "temperature"),
    ("temperature -inf", {"temperature": -INF}, 400, "temperature"),
    ("temperature 100", {"temperature": 100}, *OK), ("temperature 100.5", {"temperature": 100.5}, 400, "temperature"),
    ("temperature string", {"temperature": "hot"}, 400, "temperature"),
    ("top_p 0", {"top_p": 0}, 400, "top_p"), ("top_p 1", {"top_p": 1}, *OK),
    ("top_p NaN", {"top_p": NAN}, 400, "top_p"), ("min_p 1.5", {"min_p": 1.5}, 400, "min_p"),
    ("presence_penalty 2", {"presence_penalty": 2}, *OK),
    ("presence_penalty 2.01", {"presence_penalty": 2.01}, 400, "presence_penalty"),
    ("frequency_penalty -inf", {"frequency_penalty": -INF}, 400, "frequency_penalty"),
    ("repetition_penalty 0", {"repetition_penalty": 0}, 400, "repetition_penalty"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_tokens"), ("max_tokens -1", {"max_tokens": -1}, 400, "max_tokens"),
    ("max_tokens huge", {"max_tokens": 10**20}, 400, "max_tokens"),
    ("min_tokens past max_tokens", {"min_tokens": 3}, 400, "min_tokens"),
    ("min_tokens -1", {"min_tokens": -1}, 400, "min_tokens"),
    ("4 stop strings", {"stop": ["a", "b", "c", "d"]}, *OK), ("5 stop strings", {"stop": list("abcde")}, 400, "stop"),
    ("65 stop strings", {"stop": ["s"] * 65}, 400, "stop"), ("stop 16 chars", {"stop": "x" * 16}, *OK),
    ("stop 17 chars", {"stop": "x" * 17}, 400, "stop"), ("stop empty", {"stop": ""}, 400, "stop"),
    ("stop surrogate", {"stop": ["ok", "\ud800"]}, 400, "stop[1]"), ("stop int", {"stop": [1]}, 400, "stop[0]"),
    ("stop_token_ids last id", {"stop_token_ids": [VOCAB - 1]}, *OK),
    ("stop_token_ids vocab", {"stop_token_ids": [VOCAB]}, 400, "stop_token_ids"),
    ("stop_token_ids -1", {"stop_token_ids": [-1]}, 400, "stop_token_ids[0]"),
    ("9 stop_token_ids", {"stop_token_ids": list(range(9))}, 400, "stop_token_ids"),
    ("logit_bias last id +100", {"logit_bias": {str(VOCAB - 1): 100}}, *OK),
    ("logit_bias at limit", {"logit_bias": bias(8)}, *OK),
    ("logit_bias past limit", {"logit_bias": bias(9)}, 400, "logit_bias"),
    ("logit_bias oversized", {"logit_bias": bias(5000)}, 400, "logit_bias"),
    ("logit_bias id vocab", {"logit_bias": {str(VOCAB): 1}}, 400, "logit_bias"),
    ("logit_bias 100.5", {"logit_bias": {"5": 100.5}}, 400, "logit_bias.5"),
    ("logit_bias -101", {"logit_bias": {"5": -101}}, 400, "logit_bias.5"),
    ("logit_bias NaN", {"logit_bias": {"5": NAN}}, 400, "logit_bias.5"),
    ("logit_bias key abc", {"logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("logit_bias key -1", {"logit_bias": {"-1": 1}}, 400, "logit_bias"),
    ("logit_bias key 05", {"logit_bias": {"05": 1}}, 400, "logit_bias"),
    ("logit_bias list", {"logit_bias": [1]}, 400, "logit_bias"),
    ("prompt surrogate", {"prompt": "\ud800abc"}, 400, "prompt"),
    ("prompt empty", {"prompt": ""}, 400, "prompt"), ("prompt []", {"prompt": []}, 400, "prompt"),
    ("prompt missing", {"prompt": "-"}, 400, "prompt"), ("prompt null", {"prompt": None}, 400, "prompt"),
    ("prompt object", {"prompt": {"a": 1}}, 400, "prompt"),
    ("prompt last id", {"prompt": [VOCAB - 1]}, *OK), ("prompt id vocab", {"prompt": [VOCAB]}, 400, "prompt"),
    ("prompt id -1", {"prompt": [-1]}, 400, "prompt[0]"), ("prompt id 1.5", {"prompt": [1, 1.5]}, 400, "prompt[1]"),
    ("prompt id 2**64", {"prompt": [2**64]}, 400, "prompt"),
    ("prompt nested", {"prompt": [[[[[1]]]]]}, 400, "prompt[0][0]"),
    ("n 1e400", {"n": 1e400}, 400, "n"), ("seed 1e20", {"seed": 1e20}, 400, "seed"),
    ("4 prompts", {"prompt": ["a", "b", "c", "d"]}, *OK), ("5 prompts", {"prompt": list("abcde")}, 400, "prompt"),
    ("4 id prompts", {"prompt": [[1], [2], [3], [4]]}, *OK),
    ("prompt 200 chars", {"prompt": "x" * 200}, *OK), ("prompt 201 chars", {"prompt": "x" * 201}, 400, "prompt"),
    ("prompts 201 chars", {"prompt": ["x" * 100, "y" * 101]}, 400, "prompt"),
    ("second prompt surrogate", {"prompt": ["ab", "\udc00"]}, 400, "prompt[1]"),
    ("context overflow", {"prompt": [5] * 250, "max_tokens": 10}, 400, "max_tokens"),
    ("prompt alone overflows", {"prompt": [5] * 300, "max_tokens": 10}, 400, "prompt"),
    ("response_format json", {"response_format": {"type": "json_object"}}, *OK),
    ("response_format schema without name", {"response_format": {"type": "json_schema", "json_schema": {}}}, 400,
     "response_format.json_schema.name"),
    ("response_format bad schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frobnicate"}}}}, 400, "response_format"),
    ("response_format xml", {"response_format": {"type": "xml"}}, 400, "response_format"),
    ("response_format text", {"response_format": {"type": "text"}}, *OK),
    ("structured_outputs regex", {"structured_outputs": {"regex": "[ab]{2}"}}, *OK),
    ("structured_outputs bad regex", {"structured_outputs": {"regex": "(("}}, 400, "structured_outputs"),
    ("structured_outputs two", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
    ("structured_outputs and response_format", {"structured_outputs": {"regex": "a"},
                                                "response_format": {"type": "json_object"}}, 400,
     "structured_outputs"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tools []", {"tools": []}, 400, "tools"), ("tool_choice auto", {"tool_choice": "auto"}, 400, "tool_choice"),
    ("tool_choice none", {"tool_choice": "none"}, 400, "tool_choice"),  # chat fields, not completions
    ("suffix", {"suffix": "x"}, 400, "suffix"), ("best_of", {"best_of": 2}, 400, "best_of"),
    ("unknown field", {"foo": 1}, 400, "foo"), ("echo string", {"echo": "yes"}, 400, "echo"),
    ("stream string", {"stream": "true"}, 400, "stream"), ("user", {"user": "u-1"}, *OK),
    ("user surrogate", {"user": "\udfff"}, 400, "user"),
    ("priority past int64", {"priority": 2**63}, 400, "priority"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, *OK),
    ("stream_options unknown key", {"stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x"),
    ("model unknown", {"model": "gpt-17"}, 404, "model"), ("model int", {"model": 5}, 400, "model"),
    ("model empty", {"model": ""}, 400, "model"), ("model null", {"model": None}, *OK),
]

CHATS = [
    ("content surrogate", {"messages": msgs("\ud800")}, 400, "messages[0].content"),
    ("second content surrogate", {"messages": msgs("ok", "a\udbffb")}, 400, "messages[1].content"),
    ("role unknown", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("messages empty", {"messages": []}, 400, "messages"), ("messages missing", {"messages": "-"}, 400, "messages"),
    ("4 messages", {"messages": msgs("a", "b", "c", "d")}, *OK),
    ("5 messages", {"messages": msgs("a", "b", "c", "d", "e")}, 400, "messages"),
    ("messages 201 chars", {"messages": msgs("x" * 100, "y" * 101)}, 400, "messages"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     400, "messages[0].content[0].type"),
    ("text part", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, *OK),
    ("text part surrogate", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     400, "messages[0].content[0].text"),
    ("tool_calls of another type", {"messages": [{"role": "assistant", "content": "x", "tool_calls": [
        {"id": "c", "type": "custom", "function": {"name": "f", "arguments": "{}"}}]}]}, 400,
     "messages[0].tool_calls[0].type"),
    ("tool_calls []", {"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}, *OK),
    ("name surrogate", {"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, 400, "messages[0].name"),
    ("name", {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, *OK),
    ("max_completion_tokens huge", {"max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("max_tokens huge beside a valid max_completion_tokens", {"max_tokens": 10**6, "max_completion_tokens": 4}, 400,
     "max_tokens"),
    ("top_logprobs 20", {"logprobs": True, "top_logprobs": 20}, *OK),
    ("top_logprobs 21", {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("logprobs int", {"logprobs": 3}, 400, "logprobs"),
    ("n past limit", {"n": 5}, 400, "n"), ("seed past int64", {"seed": 2**63}, 400, "seed"),
    ("logit_bias past vocab", {"logit_bias": {"999": 5}}, 400, "logit_bias"),
    ("response_format json", {"response_format": {"type": "json_object"}}, *OK),
    ("tools, a template without them", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("tools, tool_choice none", {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"},
     *OK),
    ("tool_choice required without tools", {"tool_choice": "required"}, 400, "tool_choice"),
    ("functions", {"functions": [{"name": "f"}]}, 400, "functions"),
    ("function_call auto", {"function_call": "auto"}, 400, "function_call"),
    ("modalities audio", {"modalities": ["text", "audio"]}, 400, "modalities"),
    ("modalities text", {"modalities": ["text"]}, *OK), ("audio", {"audio": {"voice": "x"}}, 400, "audio"),
    ("store true", {"store": True}, 400, "store"), ("store false", {"store": False}, *OK),
    ("metadata", {"metadata": {"k": "v"}}, *OK),
    ("metadata 17 keys", {"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata"),
    ("chat_template untrusted", {"chat_template": "{{ messages }}"}, 400, "chat_template"),
    ("parallel_tool_calls", {"parallel_tool_calls": False}, *OK),
    ("reasoning_effort", {"reasoning_effort": "high"}, 400, "reasoning_effort"),
]

OTHERS = [  # (path, body, status, param)
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"), ("/tokenize", {"prompt": None}, 400, "prompt"),
    ("/tokenize", {"prompt": "x", "messages": msgs("x")}, 400, "messages"), ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": msgs("\ud800")}, 400, "messages[0].content"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, 400, "add_special_tokens"),
    ("/detokenize", {"tokens": [VOCAB]}, 400, "tokens"), ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens[0]"), ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": [VOCAB - 1]}, *OK),
]

RAW = [  # bodies that are not a JSON object
    ("malformed JSON", b'{"prompt": "x",,}'), ("not UTF-8", b'{"prompt": "\xff\xfe"}'), ("empty", b""),
    ("JSON array", b"[1, 2]"), ("JSON string", b'"hello"'), ("NaN literal body", b"NaN"),
    ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000), ("5000-digit integer", b'{"n": ' + b"9" * 5000 + b"}"),
]


@pytest.fixture(scope="module")
def server(tiny_dirs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy 2-core machine: one thread is many times faster
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, max_waiting_requests=1000, limits=LIMITS))
    yield s
    s.stop()
    torch.set_num_threads(threads)


def post(server, path: str, body: dict | bytes) -> httpx.Response:
    """POST a body as JSON text: lone surrogates stay \\ud800 escapes and NaN/Infinity stay literals."""
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60)


def with_fields(base: dict, fields: dict) -> dict:
    body = {**base, **fields}
    return {k: v for k, v in body.items() if v != "-"}


def assert_outcome(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text[:300]
    if status != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["param"] == param, err
        assert param.split("[")[0].split(".")[0] in err["message"], err


def assert_still_serving(server) -> None:
    r = post(server, "/v1/completions", {**BASE, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("fields,status,param", [c[1:] for c in COMPLETIONS], ids=[c[0] for c in COMPLETIONS])
def test_hostile_completion(server, fields, status, param):
    assert_outcome(post(server, "/v1/completions", with_fields(BASE, fields)), status, param)
    assert_still_serving(server)


@pytest.mark.parametrize("fields,status,param", [c[1:] for c in CHATS], ids=[c[0] for c in CHATS])
def test_hostile_chat(server, fields, status, param):
    assert_outcome(post(server, "/v1/chat/completions", with_fields(CHAT, fields)), status, param)
    assert_still_serving(server)


@pytest.mark.parametrize("path,body,status,param", OTHERS, ids=[f"{o[0]} {o[3]}" for o in OTHERS])
def test_hostile_tokenizer_endpoints(server, path, body, status, param):
    assert_outcome(post(server, path, {"model": MODEL, **body}), status, param)
    assert_still_serving(server)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("raw", [r[1] for r in RAW], ids=[r[0] for r in RAW])
def test_bodies_that_are_not_json_objects(server, path, raw):
    assert_outcome(post(server, path, raw), 400, "body")
    assert_still_serving(server)


def test_logit_bias_forces_a_token_on_both_endpoints(server):
    forced = server.state.engine.engine.tokenizer.decode([70] * 6)  # token 70: the byte "d"
    body = {**BASE, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    assert post(server, "/v1/completions", body).json()["choices"][0]["text"] != forced
    r = post(server, "/v1/completions", {**body, "logit_bias": {"70": 100}})
    assert r.json()["choices"][0]["text"] == forced
    r = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                               "logit_bias": {"70": 100}})
    assert r.json()["choices"][0]["message"]["content"] == forced


def test_logit_bias_forces_and_bans_under_greedy(make_llm):
    llm = make_llm(max_model_len=64)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    def first_ids(**kw) -> list[int]:
        return llm.generate(["hello there"], dataclasses.replace(greedy, **kw), use_tqdm=False)[0].outputs[0].token_ids

    plain = first_ids()
    assert first_ids(logit_bias={plain[0]: -100.0})[0] != plain[0]
    assert first_ids(logit_bias={70: 100.0}) == [70] * 5


def test_logit_bias_in_the_sampler():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
    rows = [SamplingRow(SamplingParams(temperature=0, logit_bias=b), None, [0], []) for b in
            ({2: 100.0}, {1: -100.0}, None)]
    assert sample(logits.clone(), rows).tolist() == [2, 3, 1]
    biased = apply_penalties(logits.clone(), rows)
    assert biased[0].tolist() == [0.0, 5.0, 101.0, 2.0] and biased[1].tolist() == [0.0, -95.0, 1.0, 2.0]
    assert biased[2].tolist() == logits[2].tolist()
    # min_tokens bans the EOS even against a +100 bias
    row = SamplingRow(SamplingParams(temperature=0, min_tokens=2, logit_bias={3: 100.0}), None, [0], [], eos_ids=(3,))
    assert sample(logits[:1].clone(), [row]).tolist() == [1]


@pytest.mark.parametrize("kw,param", [
    ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.0}, "seed"),
    ({"temperature": NAN}, "temperature"), ({"top_p": INF}, "top_p"), ({"min_p": "0.1"}, "min_p"),
    ({"n": True}, "n"), ({"n": 129}, "n"), ({"logprobs": 21}, "logprobs"), ({"top_k": -2}, "top_k"),
    ({"stop": "\ud800"}, "stop"), ({"stop": ["x"] * 65}, "stop"), ({"stop": "x" * 1025}, "stop"), ({"stop": 5}, "stop"),
    ({"stop_token_ids": 5}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"logit_bias": {1: 100.5}}, "logit_bias"), ({"logit_bias": {1: NAN}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": {"1": 1.0}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"), ({"max_tokens": 0}, "max_tokens"),
])
def test_sampling_params_refuse_offline(kw, param):
    with pytest.raises(ValueError, match=rf"^{param} ") as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_sampling_params_vocab_checks():
    SamplingParams(top_k=VOCAB, stop_token_ids=[VOCAB - 1], logit_bias={VOCAB - 1: 100.0}).check_vocab(VOCAB)
    for kw, param in [({"top_k": VOCAB + 1}, "top_k"), ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
                      ({"logit_bias": {VOCAB: 1.0}}, "logit_bias")]:
        with pytest.raises(ValueError, match=rf"^{param} must be .*\[0, {VOCAB}\)|^{param} must be .*\({VOCAB}\)"):
            SamplingParams(**kw).check_vocab(VOCAB)


def test_offline_prompt_with_a_lone_surrogate_is_refused(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(ValueError, match="prompt must be valid UTF-8") as e:
        llm.generate(["ok\ud800"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert e.value.param == "prompt"
