"""Llama 3.1 / 3.2 / 3.3 calls: a bare JSON object `{"name": f, "parameters": {...}}` as the whole message
(the templates ask for exactly that), optionally after `<|python_tag|>`, several separated by "; ".

Unconstrained output (tool_choice auto) whose text (after whitespace and the python tag) starts with "{" is
held until it ends, then read as calls; if any object does not parse or names no offered tool, the whole
text is content, as written (the format has no tags that say a call begins, so no call can be sent before
the whole text is known to be calls). Any other message streams as content at once.

Constrained output (required / named) follows the call grammar, so its calls stream as they are written,
as OpenAI streams them: a call's id and name, then pieces of its arguments.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from tuneserve.tool_calls.call_grammar import calls_grammar
from tuneserve.tool_calls.call_object import CallObjectStream, call_of
from tuneserve.tool_calls.json_spans import DECODER, ValueScanner, skip_ws
from tuneserve.tool_calls.parser import Delta, FunctionSpec, ToolCallDelta, new_call_id

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = "; "
KEYS = ("parameters", "arguments")  # the grammar writes Llama's key; some fine-tunes write OpenAI's


class Llama3JsonParser:
    name = "llama3_json"

    def detects(self, chat_template: str) -> bool:
        return '"parameters": dictionary of argument name and its value' in chat_template

    def streamer(self, tool_names: Sequence[str], progressive: bool) -> JsonCallStreamer | GrammarCallStreamer:
        return GrammarCallStreamer(tool_names) if progressive else JsonCallStreamer(tool_names)

    def grammar(self, functions: Sequence[FunctionSpec], parallel: bool, tag_ref: Callable[[str], str]) -> str:
        """Lark: one bare call (several separated by "; " when `parallel`)."""
        return calls_grammar("body", SEPARATOR, functions, parallel, args_key="parameters")

    def stop_after_call(self) -> str:
        """A second call begins so; stopping there leaves one."""
        return SEPARATOR + '{"name"'


class JsonCallStreamer:
    """CallStreamer for bare JSON calls in unconstrained output: held while they may be calls."""

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
        call = call_of(text[i:end], tools, KEYS)
        if call is None:
            return None
        calls.append(call)
        i = skip_ws(text, end)
        if i == len(text):
            return calls, ""
        if text[i] != ";":
            return None
        i += 1


class GrammarCallStreamer:
    """CallStreamer for constrained output: calls separated by "; ", each streamed as it is written. Whitespace
    and separators between calls are dropped; from anything else the grammar would not write (or an object
    that is no call), the rest of the text is content, as written."""

    def __init__(self, tool_names: Sequence[str]) -> None:
        self.tools = set(tool_names)
        self.calls, self.content = 0, False  # calls ended; past the calls (the rest is content)
        self.call: CallObjectStream | None = None
        self.end = ValueScanner()  # where the open call's object ends

    def feed(self, text: str) -> Delta:
        out = Delta()
        while text and not self.content:
            if self.call is None:
                text = text.lstrip(" \t\n\r;")
                if text.startswith("{"):
                    self.call, self.end = CallObjectStream(self.calls, self.tools, KEYS), ValueScanner()
                elif text:
                    self.content = True
                continue
            n = self.end.feed(text)
            self.call.add(text[:n])
            self.call.stream(out)
            text = text[n:]
            if self.end.done:
                self._end_call(out)
        out.content += text
        return out

    def finish(self) -> Delta:
        out = Delta()
        if self.call is not None:  # cut short (max_tokens, a stop string): a call if its name was written
            self._end_call(out)
        return out

    def _end_call(self, out: Delta) -> None:
        call, self.call = self.call, None
        if call.end(out):
            self.calls += 1
        else:
            out.content, self.content = out.content + call.body, True
