"""Tool calling: the hermes parser (whole and streamed), constrained calls that always match their schema,
the round trip through the official client, and the 400s."""

from __future__ import annotations

import json
import random

import jsonschema
import openai
import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer
from tiny_models import build_tiny_chat

from tuneserve import SamplingParams
from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings
from tuneserve.server.protocol import ChatCompletionRequest
from tuneserve.tool_calls.parser import assemble, parse
from tuneserve.tool_calls.registry import PARSERS, tool_call_parser

HERMES = PARSERS["hermes"]
NAMES = ["get_weather", "add"]

# a hermes-style template (as Qwen2.5's writes tools, calls and tool results), in the tiny byte vocabulary
TEMPLATE = (
    "{% if tools %}<bos>system: tools:{% for t in tools %} {{ t | tojson }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<bos>assistant: {% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{% endfor %}\n"
    "{% elif m.role == 'tool' %}<bos>tool: <tool_response>{{ m.content }}</tool_response>\n"
    "{% else %}<bos>{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}")

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "weather in Paris?"}]


# ----- the parser -----------------------------------------------------------------------------------
TEXTS = [
    'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [true, {"c": "}"}]}}\n</tool_call>',
    "just text, with <b>tags</b> and a <tool_ca",
    'x <tool_call>{"name": "nope", "arguments": {}}</tool_call> y',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call> and more',
    '<tool_call>\n{"name": "add", "arguments": {"a": 2}}',
    '<tool_call>\n{"name": "add", "arguments": {"a": [1, 2',
    "  \n",
    ' {"name": "add", "arguments": {"a": 3}}\n',  # a bare call, as small models write them
    '{"not": "a call"}', '{"name": "add", "arguments": {}} and then <tool_call>',
]


def test_parse_splits_content_and_calls_exactly():
    m = parse(HERMES, TEXTS[0], NAMES, progressive=False)
    assert m.content == "Checking."
    assert [(c.name, c.arguments) for c in m.calls] == [
        ("get_weather", '{"city": "Pa\\"ris}"}'), ("add", '{"a": 1, "b": [true, {"c": "}"}]}')]
    assert len({c.id for c in m.calls}) == 2 and all(c.id.startswith("call_") for c in m.calls)
    only = parse(HERMES, '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>\n', NAMES, False)
    assert only.content is None and only.calls[0].arguments == "{}"


def test_what_does_not_parse_is_content_as_written():
    for text in TEXTS[1:4] + TEXTS[6:7] + TEXTS[8:]:
        m = parse(HERMES, text, NAMES, progressive=False)
        assert m.calls == [] and m.content == text, text
    unclosed = parse(HERMES, TEXTS[4], NAMES, progressive=False)  # cut at a stop string: still a call
    assert unclosed.content is None and unclosed.calls[0].arguments == '{"a": 2}'
    bare = parse(HERMES, TEXTS[7], NAMES, progressive=False)
    assert bare.content is None and [(c.name, c.arguments) for c in bare.calls] == [("add", '{"a": 3}')]
    assert parse(HERMES, TEXTS[7], NAMES, progressive=True).calls == []  # constrained output always has tags


def check_random_pieces(parser, texts: list[str], progressive: bool) -> None:  # noqa: ANN001 - a ToolCallParser
    """Each text streamed in random pieces reassembles to its whole parse."""
    rng = random.Random(0)
    for text in texts:
        whole = parse(parser, text, NAMES, progressive)
        for _ in range(5):
            s, deltas, i = parser.streamer(NAMES, progressive), [], 0
            while i < len(text):
                k = rng.randint(1, 7)
                deltas.append(s.feed(text[i:i + k]))
                i += k
            deltas.append(s.finish())
            got = assemble(deltas)
            assert got.content == whole.content, text
            assert [(c.name, c.arguments) for c in got.calls] == [(c.name, c.arguments) for c in whole.calls]
            firsts = [d.calls[0] for d in deltas if d.calls and d.calls[0].name]
            assert all(f.id for f in firsts)  # a call's first piece carries its id and name


@pytest.mark.parametrize("progressive", [False, True])
def test_streamed_pieces_reassemble_to_the_whole_parse(progressive):
    check_random_pieces(HERMES, TEXTS, progressive)


def test_progressive_streams_arguments_before_the_call_closes():
    s = HERMES.streamer(NAMES, progressive=True)
    d = s.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1')
    assert [(p.name, p.arguments) for p in d.calls] == [("add", '{"a": 1')]
    d = s.feed('2}}\n</tool_call>')
    assert [(p.name, p.arguments) for p in d.calls] == [(None, "2}")]


def test_the_template_chooses_the_parser():
    assert tool_call_parser("auto", TEMPLATE) is HERMES
    assert tool_call_parser("auto", "{{ messages }}") is None  # renders no tools
    assert tool_call_parser("none", TEMPLATE) is None
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_call_parser("mistral-9", TEMPLATE)


# ----- through the server -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_tiny_chat(tmp_path_factory.mktemp("tools") / "qwen2", TEMPLATE, "qwen2",
                           added_tokens=("<tool_call>", "</tool_call>"))
    args = EngineArgs(model=str(path), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=1024)
    s = LiveServer(args, ServerSettings(served_model_name="tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def _calls(r):
    msg = r.choices[0].message
    return [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls or []]


def test_required_and_named_calls_always_match_their_schema(client):
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           seed=seed, temperature=1.0, max_tokens=200)
        calls = _calls(r)
        assert calls and r.choices[0].finish_reason == "tool_calls"
        for name, args in calls:
            jsonschema.validate(args, SCHEMAS[name])
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, seed=seed, temperature=1.0,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           max_tokens=200)
        (call,) = _calls(r)
        assert call[0] == "add" and r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(call[1], ADD)
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, seed=seed, temperature=1.0, max_tokens=200)
        assert len(_calls(r)) == 1


def test_streamed_tool_calls_reassemble_to_the_response(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, seed=3, temperature=1.0,
                  max_tokens=200)
        whole = client.chat.completions.create(**kw)
        calls: dict[int, dict] = {}
        reasons = []
        for chunk in client.chat.completions.create(stream=True, **kw):
            for ch in chunk.choices:
                reasons.append(ch.finish_reason)
                for d in ch.delta.tool_calls or []:
                    c = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
                    assert d.id is None or d.id == c["id"]
                    c["arguments"] += d.function.arguments or ""
        want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
        assert [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)] == want
        assert reasons[-1] == "tool_calls" and all(c["id"] for c in calls.values())


def _prompt(server, body: dict) -> str:
    """The prompt text the server renders for a chat body."""
    serving = server.state.serving
    chat = serving.prepare_chat(ChatCompletionRequest.model_validate(body))
    return serving.tokenizer.decode(chat.request.parent.prompt_token_ids)


def test_a_round_trip_renders_the_tools_the_call_and_its_result(client, server):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, seed=0, max_tokens=200,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    history = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    final = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, seed=0)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    text = _prompt(server, {"messages": history, "tools": TOOLS})
    assert '"name": "get_weather", "description": "weather"' in text  # the tools, rendered by the template
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}' in text
    assert "<tool_response>21 degrees</tool_response>" in text
    history[1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Par'  # as a model may have cut it
    assert '"arguments": "{\\"city\\": \\"Par"}' in _prompt(server, {"messages": history, "tools": TOOLS})
    assert "tools:" not in _prompt(server, {"messages": ASK, "tools": TOOLS, "tool_choice": "none"})


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"type": "nope"}}}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "functional", "function": {
        "name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls[0].type"),
])
def test_tool_requests_that_cannot_be_honoured_are_400s_naming_the_field(client, extra, param):
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", body=body, cast_to=object)
    assert e.value.body["param"] == param, e.value.body


@pytest.mark.slow
def test_qwen_coder_calls_a_tool_and_answers_from_its_result():
    """The real thing: Qwen2.5-Coder-0.5B's own template renders the tools, it calls one (auto), and answers
    from the tool's result; the streamed call reassembles to the same call."""
    from tuneserve.weights.sources import pull

    args = EngineArgs(model=str(pull("qwen2.5-coder-0.5b")), max_model_len=2048, quantization="gguf")
    s = LiveServer(args, ServerSettings(served_model_name="qwen"))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Get the current weather in a city",
            "parameters": {"type": "object", "required": ["city"], "properties": {
                "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]
        ask = [{"role": "user", "content": "What is the weather in Paris right now?"}]
        r = client.chat.completions.create(model="qwen", messages=ask, tools=tools, temperature=0, max_tokens=64)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
        assert r.choices[0].finish_reason == "tool_calls"
        streamed = {}
        for chunk in client.chat.completions.create(model="qwen", messages=ask, tools=tools, temperature=0,
                                                    max_tokens=64, stream=True):
            for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                streamed.setdefault(d.index, ["", ""])
                streamed[d.index][0] += d.function.name or ""
                streamed[d.index][1] += d.function.arguments or ""
        assert streamed == {0: [call.function.name, call.function.arguments]}
        history = [*ask, r.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "unit": "celsius"}'}]
        final = client.chat.completions.create(model="qwen", messages=history, tools=tools, temperature=0,
                                               max_tokens=64)
        assert "21" in (final.choices[0].message.content or "")
    finally:
        s.stop()


def test_offline_chat_renders_the_tools_and_the_text_parses(make_llm):
    llm = make_llm("qwen2")
    out = llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=TEMPLATE, tools=TOOLS)[0]
    assert '"name": "get_weather"' in llm.get_tokenizer().decode(out.prompt_token_ids)
    assert parse(tool_call_parser("auto", TEMPLATE), out.outputs[0].text, NAMES, False).content is not None
    plain = llm.chat(ASK, SamplingParams(max_tokens=2), use_tqdm=False, chat_template=TEMPLATE)[0]
    assert "tools:" not in llm.get_tokenizer().decode(plain.prompt_token_ids)
