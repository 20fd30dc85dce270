"""Tool calling in Llama 3.x's format (llama3_json): bare `{"name", "parameters"}` objects, optionally after
<|python_tag|>, several separated by "; ". Parsed whole and streamed alike; constrained calls stream as they
are written (name first, then pieces of the arguments) and always match their schema, through a server whose
template is Llama 3's (the tools in the user turn)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer
from test_tools import ADD, ASK, NAMES, SCHEMAS, TOOLS, check_random_pieces
from tiny_models import build_tiny_chat

from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings
from tuneserve.tool_calls.parser import assemble, parse
from tuneserve.tool_calls.registry import PARSERS, tool_call_parser

LLAMA3 = PARSERS["llama3_json"]

# Llama 3.1's way (tools in the user turn, calls as bare JSON, results from "ipython"), in the byte vocabulary
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'user' and tools %}<bos>user: Given the following functions, please respond with a JSON for "
    'a function call with its proper arguments.\nRespond in the format {"name": function name, "parameters": '
    "dictionary of argument name and its value}.\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "{{ m.content }}\n"
    "{% elif m.role == 'assistant' and m.tool_calls %}<bos>assistant: {% for c in m.tool_calls %}"
    '{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}{% endfor %}\n'
    "{% elif m.role == 'tool' %}<bos>ipython: {{ m.content }}\n"
    "{% else %}<bos>{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}")

CALLS = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa\\"ris;"}}; {"name": "add", "parameters": {}}'
TEXTS = [CALLS, ' {"name": "add", "arguments": {"a": 1}}\n', "The answer is 4; {not json}", "{\"a\": 1}",
         '{"name": "nope", "parameters": {}}', '{"name": "add", "parameters": {"a": 1}} and more',
         '{"name": "add", "parameters": {"a": [1, 2', "<|python", "", "  \n"]


def test_calls_parse_exactly_and_the_rest_is_content_as_written():
    m = parse(LLAMA3, CALLS, NAMES, progressive=False)
    assert m.content is None
    assert [(c.name, c.arguments) for c in m.calls] == [("get_weather", '{"city": "Pa\\"ris;"}'), ("add", "{}")]
    assert len({c.id for c in m.calls}) == 2
    assert [(c.name, c.arguments) for c in parse(LLAMA3, TEXTS[1], NAMES, False).calls] == [("add", '{"a": 1}')]
    for text in TEXTS[2:]:
        m = parse(LLAMA3, text, NAMES, progressive=False)
        assert m.calls == [] and (m.content or "") == text, text


def test_streamed_pieces_reassemble_to_the_whole_parse():
    check_random_pieces(LLAMA3, TEXTS, progressive=False)


def test_calls_cut_at_max_tokens_keep_the_complete_ones():
    cut = '{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"'
    m = parse(LLAMA3, cut, NAMES, False)
    assert [(c.name, c.arguments) for c in m.calls] == [("add", '{"a": 1}')]
    assert m.content == '{"name": "add", "parameters": {"'


# constrained output: what the call grammar writes, and where it may be cut (max_tokens, a stop string)
GRAMMAR_TEXTS = [CALLS.removeprefix("<|python_tag|>"), '{"name": "add", "parameters": {"a": [1, 2',
                 '{"name": "ad', '{"name": "get_weather", "parameters": {"city": "Pa\\"ris}"}}; {"na',
                 '{"name": "nope", "parameters": {}}; {"name": "add", "parameters": {}}', ""]


def test_constrained_calls_stream_as_they_are_written():
    """Name and id first, then the arguments piece by piece as the model writes them (they arrived in one
    piece once the message ended); the pieces add up to the whole parse, which reads the calls as
    unconstrained output would."""
    text = CALLS.removeprefix("<|python_tag|>")
    s = LLAMA3.streamer(NAMES, progressive=True)
    deltas = [s.feed(ch) for ch in text] + [s.finish()]
    pieces = [p for d in deltas for p in d.calls]
    assert [(p.index, p.name) for p in pieces if p.id] == [(0, "get_weather"), (1, "add")]
    assert all(p.id.startswith("call_") for p in pieces if p.name) and not any(d.content for d in deltas)
    first = [p.arguments for p in pieces if p.index == 0]
    assert first == list('{"city": "Pa\\"ris;"}')  # one piece per character written, none held back
    whole = parse(LLAMA3, text, NAMES, progressive=True)
    assert [(c.name, c.arguments) for c in assemble(deltas).calls] == [(c.name, c.arguments) for c in whole.calls]
    assert [(c.name, c.arguments) for c in whole.calls] == [
        (c.name, c.arguments) for c in parse(LLAMA3, text, NAMES, progressive=False).calls]


def test_constrained_output_cut_or_off_the_grammar():
    cut = parse(LLAMA3, GRAMMAR_TEXTS[1], NAMES, True)  # its name was streamed: a call, cut as it was
    assert cut.content is None and [(c.name, c.arguments) for c in cut.calls] == [("add", '{"a": [1, 2')]
    assert parse(LLAMA3, GRAMMAR_TEXTS[2], NAMES, True).content == '{"name": "ad'
    second = parse(LLAMA3, GRAMMAR_TEXTS[3], NAMES, True)  # the second call cut before its name
    assert [c.name for c in second.calls] == ["get_weather"] and second.content == '{"na'
    unknown = parse(LLAMA3, GRAMMAR_TEXTS[4], NAMES, True)  # no call: the rest is content, as written
    assert unknown.calls == [] and unknown.content == GRAMMAR_TEXTS[4]


def test_constrained_pieces_reassemble_to_the_whole_parse():
    check_random_pieces(LLAMA3, GRAMMAR_TEXTS, progressive=True)


def test_plain_text_streams_at_once():
    s = LLAMA3.streamer(NAMES, False)
    assert s.feed("The ").content == "The " and s.feed("answer").content == "answer"


def test_the_template_chooses_the_parser():
    assert tool_call_parser("auto", TEMPLATE) is LLAMA3
    assert tool_call_parser("llama3_json", "{{ tools }}") is LLAMA3


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = build_tiny_chat(tmp_path_factory.mktemp("llama3-tools") / "llama", TEMPLATE)
    s = LiveServer(EngineArgs(model=str(path), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=1024),
                   ServerSettings(served_model_name="tiny"))
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused"), s
    s.stop()


def test_required_and_named_calls_match_their_schema_and_stream_alike(client):
    client, server = client
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, temperature=1.0, max_tokens=200)
        calls = r.choices[0].message.tool_calls
        assert calls and r.choices[0].finish_reason == "tool_calls"
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, seed=seed, temperature=1.0, max_tokens=200,
                  tool_choice={"type": "function", "function": {"name": "add"}})
        (call,) = client.chat.completions.create(**kw).choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), ADD)
        streamed, pieces = {}, []
        for chunk in client.chat.completions.create(stream=True, **kw):
            for d in chunk.choices[0].delta.tool_calls or []:
                assert (d.id is not None) == (d.index not in streamed)  # the id comes once, first, with the name
                streamed.setdefault(d.index, [d.function.name, ""])[1] += d.function.arguments or ""
                pieces.append(d.function.arguments)
        assert list(streamed.values()) == [["add", call.function.arguments]]
        assert len([p for p in pieces if p]) > 1  # "add" takes a and b: its arguments come in pieces
    history = [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "add", "arguments": '{"a": 1}'}}]}, {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    prompt = server.state.serving.prepare_chat
    from tuneserve.server.protocol import ChatCompletionRequest

    ids = prompt(ChatCompletionRequest.model_validate({"messages": history, "tools": TOOLS})).request.parent
    text = server.state.serving.tokenizer.decode(ids.prompt_token_ids)
    assert '{"name": "add", "parameters": {"a": 1}}' in text and "ipython: 2" in text
