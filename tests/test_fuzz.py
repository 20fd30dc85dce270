"""Schemathesis against the server's own OpenAPI document (app.openapi()), on tiny random models.

Every operation gets positive cases (bodies the schema allows: they must be served or refused with a
4xx, and the responses must match the documented statuses, media types and bodies) and, where it takes a
body, negative cases (bodies the schema forbids: they must be refused with a 4xx). No case may get a 5xx,
and the engine must serve a normal request afterwards. The schema carries the server's limits and the
model's vocabulary and context (schema.py), so positive cases really reach the engine.

A server whose model renders no tools publishes a schema without them; so chat is fuzzed a second time on a
model whose template renders tools in hermes's format (tools, tool_choice, parallel_tool_calls, assistant
calls and tool results), with extra cases focused on requests that reach the parser and the call grammar.
"""

from __future__ import annotations

import collections
import copy
import json
import time
from dataclasses import dataclass, field

import httpx
import pytest
import requests
import schemathesis
import torch
from conftest import TINY_KV_BYTES
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_utils import LiveServer
from tiny_models import build_tiny_chat

from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings
from tuneserve.server.limits import RequestLimits

MODEL = "tiny"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
# small limits and context keep each case fast (a case runs at most 2 x 3 sequences of 64 tokens)
LIMITS = RequestLimits(max_n=2, max_prompts=3, max_prompt_chars=24, max_messages=3, max_stop=3, max_stop_chars=8,
                       max_stop_token_ids=4, max_logit_bias=8)
# examples per (operation, mode) in the default run; the slow run takes ten times as many
EXAMPLES = {"POST /v1/completions": (70, 40), "POST /v1/chat/completions": (70, 40), "POST /tokenize": (20, 15),
            "POST /detokenize": (20, 15)}
GET_OPERATIONS = ("GET /health", "GET /version", "GET /metrics", "GET /v1/models")
CHAT, TOOL_CHAT = "POST /v1/chat/completions", "tools: POST /v1/chat/completions"
# chat on the model that calls tools: positive and negative examples of its served schema in the default run
TOOL_EXAMPLES = (30, 20)
# then examples focused on each kind of tool_choice, streamed or not (focus_on_tools): left alone, hypothesis
# picks "auto" most and rarely streams
FOCUSED = [({"const": "required"}, True, 25), ({"$ref": "#/components/schemas/NamedToolChoice"}, False, 25),
           ({"enum": ["none", "auto"]}, None, 20)]
# hermes's format (so the hermes parser is chosen) as compact as the short context needs: tools by name, the
# assistant's calls in <tool_call> tags with their arguments, tool results as turns of their own
TOOL_TEMPLATE = (
    "{% if tools %}<bos>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<bos>assistant:{% for c in m.tool_calls %}<tool_call>"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{% endfor %}\n"
    "{% elif m.role == 'tool' %}<bos>tool: {{ m.content }}\n"
    "{% else %}<bos>{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}")
# what the tool cases must have reached between them (positive cases only)
TOOL_FEATURES = {"tools", "tool_choice=none", "tool_choice=auto", "tool_choice=required", "tool_choice=named",
                 "parallel_tool_calls", "assistant tool_calls", "role tool", "called", "called (stream)"}


@pytest.fixture(scope="module")
def one_thread():
    # one intra-op thread: on a busy 2-core machine two threads make a tiny model's step 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(tiny_dirs, one_thread):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=64)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, max_waiting_requests=10_000, limits=LIMITS))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, one_thread):
    path = build_tiny_chat(tmp_path_factory.mktemp("fuzz-tools") / "llama", TOOL_TEMPLATE,
                           added_tokens=("<tool_call>", "</tool_call>"))
    # a longer context than the other server's: the tools' names and the calls in the history take room
    args = EngineArgs(model=str(path), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=128)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, max_waiting_requests=10_000, limits=LIMITS))
    assert s.state.serving.tool_parser.name == "hermes"
    yield s
    s.stop()


def operations(doc: dict) -> dict:
    # schemathesis reads 20 events of a stream by default: read them all (a case streams at most 2 x 128 tokens)
    schema = schemathesis.openapi.from_dict(doc, config=SchemathesisConfig.from_dict({"max-stream-events": 1000}))
    return {op.label: op for op in (r.ok() for r in schema.get_all_operations())}


def focus_on_tools(doc: dict, tool_choice: dict, stream: bool | None) -> dict:
    """A narrower copy of a served schema: every case it allows, the served one allows too. Chat requests
    always have tools, of distinct names (f, g, h), a tool_choice of the given schema (a named one may name
    an absent tool, i) and parallel_tool_calls (true, false or null); `stream` (None: either way); room for a
    call's name and the start of its arguments (max_tokens). Left to the served schema, most tool cases have
    no tools or no tool_choice, repeat a name or name an absent tool, or stop after a token or two, before
    they reach the prompt, the parser or the grammar."""
    doc = copy.deepcopy(doc)
    comps = doc["components"]["schemas"]

    def tool(name: str) -> dict:
        function = copy.deepcopy(comps["FunctionDefinition"])
        function["properties"]["name"] = {"const": name}
        return {**copy.deepcopy(comps["ToolDefinition"]), "properties": {
            **comps["ToolDefinition"]["properties"], "function": function}}

    chat = comps["ChatCompletionRequest"]
    chat["required"] = [*chat.get("required", []), "tools", "tool_choice", "parallel_tool_calls", "max_tokens"]
    chat["properties"]["tools"] = {"type": "array", "prefixItems": [tool(n) for n in "fgh"], "items": False,
                                   "minItems": 1}
    chat["properties"]["tool_choice"] = tool_choice
    chat["properties"]["max_tokens"] = {"type": "integer", "minimum": 32, "maximum": 48}
    chat["properties"]["max_completion_tokens"] = {"type": "null"}
    if stream is not None:
        chat["properties"]["stream"] = {"const": stream}
        chat["required"].append("stream")
    comps["FunctionRef"]["properties"]["name"] = {"enum": ["f", "g", "h", "i"]}
    return doc


def tool_features(body: object, response: requests.Response) -> set[str]:
    """What of tool calling a chat case asked for, and whether its answer called a tool."""
    if not isinstance(body, dict):
        return set()
    choice, messages = body.get("tool_choice"), body.get("messages") or []
    seen = {k for k in ("tools", "parallel_tool_calls") if body.get(k) is not None}
    if choice is not None:
        seen.add(f"tool_choice={choice if isinstance(choice, str) else 'named'}")
    seen |= {"assistant tool_calls" for m in messages if m.get("role") == "assistant" and m.get("tool_calls")}
    seen |= {"role tool" for m in messages if m.get("role") == "tool"}
    if response.status_code == 200 and '"tool_calls"' in response.text:
        seen.add("called (stream)" if body.get("stream") else "called")
    return seen


@dataclass
class Fuzzer:
    """Sends the generated cases of operations and checks each response; tallies what it saw."""

    session: requests.Session
    tally: collections.Counter = field(default_factory=collections.Counter)  # (label, mode, status) -> cases
    features: collections.Counter = field(default_factory=collections.Counter)  # tool features of positive cases

    def run(self, op, mode: GenerationMode, examples: int, url: str, label: str | None = None,
            tools: bool = False) -> None:
        """Generate up to `examples` cases of op in `mode`, send each and check its response."""
        label, mode_name = label or op.label, mode.value

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case) -> None:
            response = case.call(base_url=url, session=self.session, timeout=60)
            self.tally[(label, mode_name, response.status_code)] += 1
            if tools and mode == GenerationMode.POSITIVE:
                self.features.update(tool_features(case.body, response))
            case.validate_response(response, checks=CHECKS)

        one()


def fuzz(server, tool_server, scale: int) -> Fuzzer:
    ops = operations(server.app.openapi())
    assert set(ops) == set(EXAMPLES) | set(GET_OPERATIONS)
    with requests.Session() as session:
        fuzzer = Fuzzer(session)
        for label in GET_OPERATIONS:
            fuzzer.run(ops[label], GenerationMode.POSITIVE, 1, server.url)
        for label, (positive, negative) in EXAMPLES.items():
            fuzzer.run(ops[label], GenerationMode.POSITIVE, positive * scale, server.url)
            fuzzer.run(ops[label], GenerationMode.NEGATIVE, negative * scale, server.url)
        fuzz_tools(fuzzer, tool_server, scale)
    return fuzzer


def fuzz_tools(fuzzer: Fuzzer, server, scale: int) -> None:
    """Chat on the model that calls tools: its served schema, positive and negative, then focused cases."""
    doc = server.app.openapi()
    tools = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]["tools"]
    assert tools["anyOf"][0]["items"] == {"$ref": "#/components/schemas/ToolDefinition"}, json.dumps(tools)
    positive, negative = TOOL_EXAMPLES
    chat = operations(doc)[CHAT]
    fuzzer.run(chat, GenerationMode.POSITIVE, positive * scale, server.url, TOOL_CHAT, tools=True)
    fuzzer.run(chat, GenerationMode.NEGATIVE, negative * scale, server.url, TOOL_CHAT)
    for tool_choice, stream, examples in FOCUSED:
        focus = operations(focus_on_tools(doc, tool_choice, stream))[CHAT]
        fuzzer.run(focus, GenerationMode.POSITIVE, examples * scale, server.url, TOOL_CHAT, tools=True)


def assert_alive_and_idle(server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "still here", "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    eng = server.state.engine.engine
    deadline = time.time() + 10
    while (eng.has_unfinished_requests() or eng.kv.usage) and time.time() < deadline:
        time.sleep(0.02)
    assert not eng.has_unfinished_requests() and eng.kv.usage == 0


def report(tally: collections.Counter) -> tuple[int, dict]:
    """Total cases, and per (operation, mode) the count of each status; printed for the release notes."""
    table: dict = collections.defaultdict(collections.Counter)
    for (label, mode, status), n in tally.items():
        table[(label, mode)][status] += n
    for key, statuses in sorted(table.items()):
        print(key, dict(sorted(statuses.items())))
    return sum(tally.values()), table


def check_coverage(fuzzer: Fuzzer, minimum: int) -> None:
    total, table = report(fuzzer.tally)
    print("tool features", dict(sorted(fuzzer.features.items())))
    assert total >= minimum, total
    assert not any(s >= 500 for statuses in table.values() for s in statuses)
    for label in ("POST /v1/completions", CHAT, "POST /tokenize", "POST /detokenize", TOOL_CHAT):
        positive, negative = table[(label, "positive")], table[(label, "negative")]
        # the schema is precise: most positive cases are served, and every negative one is refused
        assert positive[200] >= sum(positive.values()) // 2, (label, positive)
        assert set(negative) <= {400, 404}, (label, negative)
    assert TOOL_FEATURES <= set(fuzzer.features), TOOL_FEATURES - set(fuzzer.features)


def test_fuzz_every_endpoint(server, tool_server):
    check_coverage(fuzz(server, tool_server, scale=1), minimum=400)
    assert_alive_and_idle(server)
    assert_alive_and_idle(tool_server)


@pytest.mark.slow
def test_fuzz_every_endpoint_long(server, tool_server):
    check_coverage(fuzz(server, tool_server, scale=10), minimum=4000)
    assert_alive_and_idle(server)
    assert_alive_and_idle(tool_server)
