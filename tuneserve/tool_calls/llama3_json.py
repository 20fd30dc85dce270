"""Llama 3.1 / 3.2 / 3.3 calls: a bare JSON object `{"name": f, "parameters": {...}}` as the whole message
(the templates ask for exactly that), optionally after `<|python_tag|>`, several separated by "; ".

A message whose text (after whitespace and the python tag) starts with "{" is held until it ends, then read
as calls; if any object does not parse or names no offered tool, the whole text is content, as written.
Any other message streams as content at once. Calls are sent whole, each once the message ends (the format
has no tags to stream an open call against); constrained output (required / named) ends with the last call.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from tuneserve.tool_calls.json_spans import DECODER, ValueScanner, object_members, skip_ws
from tuneserve.tool_calls.parser import Delta, FunctionSpec, ToolCallDelta, new_call_id
from tuneserve.tool_calls.tagged import calls_grammar

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = "; "


class Llama3JsonParser:
    name = "llama3_json"

    def detects(self, chat_template: str) -> bool:
        return '"parameters": dictionary of argument name and its value' in chat_template

    def streamer(self, tool_names: Sequence[str], progressive: bool) -> JsonCallStreamer:
        return JsonCallStreamer(tool_names)

    def grammar(self, functions: Sequence[FunctionSpec], parallel: bool, tag_ref: Callable[[str], str]) -> str:
        """Lark: one bare call (several separated by "; " when `parallel`)."""
        return calls_grammar("body", SEPARATOR, functions, parallel, args_key="parameters")

    def stop_after_call(self) -> str:
        """A second call begins so; stopping there leaves one."""
        return SEPARATOR + '{"name"'


class JsonCallStreamer:
    """CallStreamer for bare JSON calls."""

    def __init__(self, tool_names: Sequence[str]) -> None:
        self.tools = set(tool_names)
        self.held: str | None = ""  # the text while it may be calls; None once it is content

    def feed(self, text: str) -> Delta:
        if self.held is None:
            return Delta(content=text)
        self.held += text
        start = self.held.lstrip()
        if not start or PYTHON_TAG.startswith(start) or start.removeprefix(PYTHON_TAG).lstrip()[:1] in ("", "{"):
            return Delta()
        out, self.held = Delta(content=self.held), None
        return out

    def finish(self) -> Delta:
        text, self.held = self.held, None
        if not text:
            return Delta()
        found = calls_of(text, self.tools)
        if found is None:
            return Delta(content=text)
        calls, rest = found
        out = Delta(content=rest)
        for i, (name, args) in enumerate(calls):
            out.add_call(ToolCallDelta(i, new_call_id(), name, args))
        return out


def calls_of(text: str, tools: set[str]) -> tuple[list[tuple[str, str]], str] | None:
    """(name, arguments text) of each call in text, or None when text is not calls to offered tools. Text cut
    inside a call after complete ones (at max_tokens) gives those calls, and the cut call as content."""
    i = len(text) - len(text.lstrip())
    if text.startswith(PYTHON_TAG, i):
        i += len(PYTHON_TAG)
    calls: list[tuple[str, str]] = []
    while True:
        i = skip_ws(text, i)
        try:
            _, end = DECODER.raw_decode(text, i)
        except json.JSONDecodeError:
            cut = ValueScanner()
            cut.feed(text[i:])
            return (calls, text[i:]) if calls and text.startswith("{", i) and not cut.done else None
        call = _call(text[i:end], tools)
        if call is None:
            return None
        calls.append(call)
        i = skip_ws(text, end)
        if i == len(text):
            return calls, ""
        if text[i] != ";":
            return None
        i += 1


def _call(body: str, tools: set[str]) -> tuple[str, str] | None:
    members = object_members(body)
    if members is None or "name" not in members:
        return None
    key = "parameters" if "parameters" in members else "arguments"  # some fine-tunes write OpenAI's key
    if key not in members or members["name"][0] not in tools or not isinstance(members[key][0], dict):
        return None
    _, start, end = members[key]
    return members["name"][0], body[start:end]

