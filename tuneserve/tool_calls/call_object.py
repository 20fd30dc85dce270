"""One call written as a JSON object, `{"name": f, "<arguments key>": {...}}`: read whole, or streamed as it
is written (its id and name once the name is complete, then its arguments as they grow), as OpenAI streams
calls. Every format whose calls are such objects (hermes inside tags, Llama 3 bare) reads them here, so that
a streamed call and a whole one always agree."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

from tuneserve.tool_calls.json_spans import ValueScanner, object_members
from tuneserve.tool_calls.parser import Delta, ToolCallDelta, new_call_id

# a JSON string literal: only the escapes JSON has, so that json.loads always reads what this matches
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'


@functools.cache
def _head(args_key: str) -> re.Pattern:
    """The head of a call written in the grammar's order: the name, then the arguments' key (its object next)."""
    return re.compile(rf'\s*\{{\s*"name"\s*:\s*({_STRING})\s*,\s*"{re.escape(args_key)}"\s*:\s*(?=\{{)')


def call_of(body: str, tools: set[str], keys: Sequence[str] = ("arguments",)) -> tuple[str, str] | None:
    """(name, arguments text) of a call's JSON object (its arguments under the first of `keys` it has), or
    None when it is not one object calling an offered tool with an object of arguments."""
    members = object_members(body)
    if members is None or "name" not in members:
        return None
    key = next((k for k in keys if k in members), None)
    if key is None:
        return None
    name, (args, start, end) = members["name"][0], members[key]
    # a model may write any JSON as the name: only a string can name a tool (a list is not even hashable)
    if not isinstance(name, str) or name not in tools or not isinstance(args, dict):
        return None
    return name, body[start:end]


class CallObjectStream:
    """One call's object as it arrives (`add`), sent as deltas of the call at `index`: as it grows (`stream`:
    the output follows the call grammar, so what is written stays) or once it ends (`end`)."""

    def __init__(self, index: int, tools: set[str], keys: Sequence[str] = ("arguments",)) -> None:
        self.index, self.tools, self.keys = index, tools, tuple(keys)
        self.body, self.id, self.name_sent = "", new_call_id(), False
        self.args_start = self.scanned = 0  # where the arguments begin in body; how far they were sent
        self.scanner = ValueScanner()

    def add(self, text: str) -> None:
        self.body += text

    def stream(self, out: Delta) -> None:
        """Send the name as soon as it is written, then the arguments as they grow (never past their end)."""
        if not self.name_sent:
            head = _head(self.keys[0]).match(self.body)  # the grammar writes the first key
            name = json.loads(head[1]) if head is not None else None
            if name not in self.tools:
                return
            out.add_call(ToolCallDelta(self.index, self.id, name, ""))
            self.name_sent, self.args_start = True, head.end()
            self.scanned = self.args_start
        if not self.scanner.done:
            new = self.body[self.scanned:]
            n = self.scanner.feed(new)
            self.scanned += n
            if n:
                out.add_call(ToolCallDelta(self.index, arguments=new[:n]))

    def end(self, out: Delta) -> bool:
        """The object is complete (or cut short): send what is left of the call. False when the object is no
        call and nothing of it was sent (the caller gives it back as content)."""
        call = call_of(self.body, self.tools, self.keys)
        if self.name_sent:  # already streaming: send what the exact span adds (nothing, once it closed)
            sent = self.body[self.args_start:self.scanned]
            if call is not None and call[1].startswith(sent) and len(call[1]) > len(sent):
                out.add_call(ToolCallDelta(self.index, arguments=call[1][len(sent):]))
            return True
        if call is None:
            return False
        out.add_call(ToolCallDelta(self.index, self.id, *call))
        return True
