"""Tool-calling requests and model outputs that once broke the server: each found by the fuzz (test_fuzz.py)
or by reading the code it led to, each with its exact answer now. Requests are sent as raw JSON (lone
surrogates escaped), so that what the server gets is exactly what is written here."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from conftest import TINY_KV_BYTES
from pydantic import BaseModel
from server_utils import LiveServer
from test_tools import ASK, NAMES, TEMPLATE, TOOLS
from tiny_models import build_tiny_chat

from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings
from tuneserve.server.protocol import ChatCompletionRequest
from tuneserve.server.schema import _add_model
from tuneserve.server.tools import ToolPlan, chat_message, template_arguments
from tuneserve.tool_calls.call_grammar import call_schema
from tuneserve.tool_calls.parser import FunctionSpec, parse
from tuneserve.tool_calls.registry import PARSERS

HERMES, LLAMA3 = PARSERS["hermes"], PARSERS["llama3_json"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_tiny_chat(tmp_path_factory.mktemp("tools-hostile") / "qwen2", TEMPLATE, "qwen2",
                           added_tokens=("<tool_call>", "</tool_call>"))
    s = LiveServer(EngineArgs(model=str(path), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=1024),
                   ServerSettings(served_model_name="tiny"))
    yield s
    s.stop()


def post(server, **fields) -> httpx.Response:
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 60, "seed": 0, **fields}
    return httpx.post(server.url + "/v1/chat/completions", content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json"})


def served_schema_validator(server, component: str) -> jsonschema.Draft202012Validator:
    """A validator of one component of the served OpenAPI document (its references resolved in it)."""
    doc = server.app.openapi()
    return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{component}", **doc})


# ----- the documented responses -----------------------------------------------------------------------
def test_responses_that_call_tools_match_the_served_schema(server):
    """Found by the fuzz: `{"messages": [{"role": "developer"}], "tools": [{"type": "function", "function":
    {"name": "0"}}], "tool_choice": {"type": "function", "function": {"name": "0"}}}` was answered with
    "content": null, which the schema documented as a string (and tool_calls were not documented at all)."""
    named = {"type": "function", "function": {"name": "add"}}
    r = post(server, tool_choice=named)
    message = r.json()["choices"][0]["message"]
    assert r.status_code == 200 and message["content"] is None and message["tool_calls"][0]["function"]["name"] == "add"
    served_schema_validator(server, "ChatCompletionResponse").validate(r.json())
    chunks = [json.loads(line[6:]) for line in post(server, tool_choice=named, stream=True).text.splitlines()
              if line.startswith("data: {")]
    assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    validate_chunk = served_schema_validator(server, "ChatCompletionChunk")
    for chunk in chunks:
        validate_chunk.validate(chunk)
    with pytest.raises(jsonschema.ValidationError):  # the schema says what it must: arguments are a string
        served_schema_validator(server, "ChatCompletionResponse").validate(
            {**r.json(), "choices": [{**r.json()["choices"][0], "message": {**message, "tool_calls": [
                {**message["tool_calls"][0], "function": {"name": "add", "arguments": {}}}]}}]})


def test_a_response_model_cannot_replace_a_request_model_of_the_same_name(server):
    """The response's call models were first named like the request's (CalledFunction): the response's
    schema silently replaced the request's, whose name pattern the fuzz then no longer saw."""
    called = server.app.openapi()["components"]["schemas"]["CalledFunction"]
    assert called["properties"]["name"]["pattern"] == "^[A-Za-z0-9_.-]{1,64}$"

    class CalledFunction(BaseModel):
        name: str

    comps: dict = {"CalledFunction": called}
    with pytest.raises(ValueError, match="two schemas are named 'CalledFunction'"):
        _add_model(comps, CalledFunction)


# ----- model output the parsers must read, whatever it is ------------------------------------------------
NO_STRING_NAMES = [(HERMES, '<tool_call>\n{"name": ["add"], "arguments": {}}\n</tool_call>'),
                   (HERMES, '{"name": {"add": 1}, "arguments": {}}'),  # a bare call, as small models write them
                   (LLAMA3, '{"name": ["add"], "parameters": {"a": 1}}')]


@pytest.mark.parametrize("parser, text", NO_STRING_NAMES)
@pytest.mark.parametrize("progressive", [False, True])
def test_a_name_that_is_no_string_is_content(parser, text, progressive):
    """A model may write any JSON as a call's name; a list or an object was looked up in the set of tool
    names, and raised TypeError (unhashable): a 500, or an error event ending the stream."""
    m = parse(parser, text, NAMES, progressive)
    assert m.calls == [] and m.content == text
    plan = ToolPlan(parser, tuple(NAMES), constrained=progressive)
    assert chat_message(plan, text, "stop") == {"message": {"role": "assistant", "content": text},
                                                "finish_reason": "stop"}


def test_a_name_with_an_escape_json_lacks_is_content():
    """The head of a streamed call matched any backslash escape in the name, then json.loads raised on one
    JSON lacks (\\q)."""
    text = '<tool_call>\n{"name": "ad\\q", "arguments": {"a": 1}}\n</tool_call>'
    m = parse(HERMES, text, NAMES, progressive=True)
    assert m.calls == [] and m.content == text
    ok = parse(HERMES, '<tool_call>\n{"name": "\\u0061dd", "arguments": {"a": 1}}\n</tool_call>', NAMES, True)
    assert [(c.name, c.arguments) for c in ok.calls] == [("add", '{"a": 1}')]


# ----- the schemas of constrained calls ------------------------------------------------------------------
TREE = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}},
        "additionalProperties": False}
SAME_AS_A = {"type": "object", "properties": {"a": {"enum": [1, 2]}, "b": {"$ref": "#/properties/a"}},
             "required": ["a", "b"], "additionalProperties": False}


def test_references_in_parameters_point_into_the_arguments():
    """A `$ref` of the parameters' schema ("#", "#/properties/...") meant the parameters' root; inside the
    call's schema it pointed at the call: a tree's children had to be calls, and "#/properties/a" did not
    exist."""
    tree = call_schema(FunctionSpec("f", TREE))
    jsonschema.validate({"name": "f", "arguments": {"kids": [{"kids": []}, {}]}}, tree)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "f", "arguments": {"kids": [{"name": "f", "arguments": {}}]}}, tree)
    same = call_schema(FunctionSpec("f", SAME_AS_A), "parameters")
    jsonschema.validate({"name": "f", "parameters": {"a": 1, "b": 2}}, same)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "f", "parameters": {"a": 1, "b": 3}}, same)
    data = {"type": "object", "properties": {"c": {"const": {"$ref": "#"}}}}  # data, not a reference
    args = call_schema(FunctionSpec("f", data))["properties"]["arguments"]
    assert args["properties"]["c"] == {"const": {"$ref": "#"}}


def test_a_reference_into_the_parameters_is_served(server):
    """Was a 400 (the pointer /properties/a does not exist in the call's schema)."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": SAME_AS_A}}]
    for seed in range(3):
        r = post(server, tools=tools, tool_choice="required", parallel_tool_calls=False, seed=seed,
                 temperature=1.0, max_tokens=100)
        (call,) = r.json()["choices"][0]["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), SAME_AS_A)


def test_a_call_object_is_always_an_object(server):
    """Parameters that do not say "object" let a named call write arguments that are no object
    (`"arguments": 7`): the response had no call, and its half-written call as content."""
    named = {"type": "function", "function": {"name": "f"}}
    for parameters in ({"$defs": {"n": {"type": "integer"}}}, {"properties": {"x": {"type": "integer"}}}):
        tools = [{"type": "function", "function": {"name": "f", "parameters": parameters}}]
        message = post(server, tools=tools, tool_choice=named, temperature=0, max_tokens=100).json()["choices"][0][
            "message"]
        assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "f", message
        assert message["tool_calls"][0]["function"]["arguments"].startswith("{")


def deep(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# (what, fields, status, param): each was a 200 with no call, a 500, or a 400 naming "messages" with an
# error from the template or the tokenizer
REFUSED = [
    ("parameters of an array", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ("parameters 300 levels deep", {"tools": [{"type": "function", "function": {"name": "f", "parameters": deep(
        300)}}]}, "tools[0].function.parameters"),
    ("a description with a lone surrogate", {"tools": [{"type": "function", "function": {
        "name": "f", "description": "a\ud800"}}]}, "tools[0].function.description"),
    ("parameters with a lone surrogate", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "description": "\udfff"}}}]}, "tools[0].function.parameters"),
    ("arguments with a lone surrogate", {"messages": [*ASK, {"role": "assistant", "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "add", "arguments": '{"a": "\ud800"}'}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    # "#" with the sibling that makes the arguments an object: refused at compile time; it was a 500 when the
    # first token could not be matched ("Too many items")
    ("parameters that are their own reference", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"$ref": "#"}}}], "tool_choice": "required"}, "tools"),
]


@pytest.mark.parametrize("what, fields, param", REFUSED, ids=[r[0] for r in REFUSED])
def test_tool_fields_that_cannot_be_served_are_400s_naming_the_field(server, what, fields, param):
    r = post(server, **fields)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert post(server, max_tokens=2).status_code == 200


def test_call_arguments_that_would_not_render_are_given_to_the_template_as_written(server):
    """An earlier call's arguments that parse into a value no template renders (an escaped lone surrogate,
    nesting past Python's recursion, a 5000-digit integer) were a 400 naming messages with the error of the
    template or the tokenizer; the model may well have written them so."""
    for text in ('"\\ud800"', "[" * 100_000, "[" * 65 + "]" * 65, "1" * 5000):
        assert template_arguments(text) == text
    assert template_arguments('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    assert template_arguments("[" * 64 + "]" * 64) == json.loads("[" * 64 + "]" * 64)
    args = '{"a": "\\ud800"}'
    history = [*ASK, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "add", "arguments": args}}]}, {"role": "tool", "tool_call_id": "c", "content": "2"}]
    r = post(server, messages=history, max_tokens=2)
    assert r.status_code == 200, r.text
    chat = server.state.serving.prepare_chat(ChatCompletionRequest.model_validate({"messages": history,
                                                                                   "tools": TOOLS}))
    prompt = server.state.serving.tokenizer.decode(chat.request.parent.prompt_token_ids)
    assert f'"arguments": {json.dumps(args)}' in prompt
