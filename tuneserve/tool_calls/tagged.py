"""Calls written as tags around a JSON object with a name and arguments:
`<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>` (hermes, as Qwen2.5's template writes them).

Content outside the tags streams as it comes, holding back only what may be the start of a tag. Whitespace
around calls is dropped. A call whose body does not parse (or names no offered tool) is content, as written.
Small models often write a lone call without its tags (Qwen2.5-Coder-0.5B does); unconstrained output that
begins with "{" is therefore held until it ends, and is a call if it is one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tuneserve.structured.llguidance_backend import JSON_OPTIONS
from tuneserve.tool_calls.json_spans import ValueScanner, object_members
from tuneserve.tool_calls.parser import Delta, FunctionSpec, ToolCallDelta, new_call_id

# the head of a call written in the grammar's order: the name, then the arguments' key
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (it may be completed by the next piece)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class TaggedCallStreamer:
    """CallStreamer for tagged calls."""

    def __init__(self, open_tag: str, close_tag: str, tool_names: Sequence[str], progressive: bool) -> None:
        self.open, self.close, self.tools, self.progressive = open_tag, close_tag, set(tool_names), progressive
        self.buf, self.inside, self.calls = "", False, 0
        self.held_ws, self.after_call = "", False  # whitespace held back; just after a call (drop its ws)
        self.lead: str | None = None if progressive else ""  # the output's start, while it may be a bare call

    def feed(self, text: str) -> Delta:
        if self.lead is not None:
            self.lead += text
            start = self.lead.lstrip()
            if not start or (start.startswith("{") and self.open not in self.lead):
                return Delta()
            text, self.lead = self.lead, None
        return self._feed(text)

    def _feed(self, text: str) -> Delta:
        self.buf += text
        out = Delta()
        while True:
            tag = self.close if self.inside else self.open
            i = self.buf.find(tag)
            if i < 0:
                cut = len(self.buf) - _partial_tag(self.buf, tag)
                piece, self.buf = self.buf[:cut], self.buf[cut:]
                self._body(out, piece) if self.inside else self._content(out, piece)
                return out
            piece, self.buf = self.buf[:i], self.buf[i + len(tag):]
            if self.inside:
                self._body(out, piece)
                self._end_call(out, closed=True)
            else:
                self._content(out, piece, before_call=True)
                self._start_call()

    def finish(self) -> Delta:
        out = Delta()
        if self.lead is not None:
            text, self.lead = self.lead, None
            call = _call_of(text, self.tools)
            if call is not None:
                out.add_call(ToolCallDelta(0, new_call_id(), *call))
                self.calls = 1
                return out
            out.extend(self._feed(text))
        piece, self.buf = self.buf, ""
        if self.inside:
            self._body(out, piece)
            self._end_call(out, closed=False)
        else:
            self._content(out, piece)
        if self.held_ws and not self.calls:
            out.content += self.held_ws
        self.held_ws = ""
        return out

    # ----- content -------------------------------------------------------------------------------
    def _content(self, out: Delta, text: str, before_call: bool = False) -> None:
        text, self.held_ws = self.held_ws + text, ""
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        body = text.rstrip()
        if before_call:
            self.ws_before = text[len(body):]  # given back if the call turns out not to parse
        else:
            self.held_ws = text[len(body):]  # sent once something follows it
        out.content += body

    # ----- calls ---------------------------------------------------------------------------------
    def _start_call(self) -> None:
        self.inside, self.body, self.id, self.name_sent = True, "", new_call_id(), False
        self.args_start = self.scanned = 0
        self.scanner = ValueScanner()

    def _body(self, out: Delta, text: str) -> None:
        self.body += text
        if self.progressive:
            self._progress(out)

    def _progress(self, out: Delta) -> None:
        """Send the name as soon as it is written, then the arguments as they grow (never past their end)."""
        if not self.name_sent:
            head = _HEAD.match(self.body)
            name = json.loads(head[1]) if head is not None else None
            if name not in self.tools:
                return
            out.add_call(ToolCallDelta(self.calls, self.id, name, ""))
            self.name_sent, self.args_start = True, head.end()
            self.scanned = self.args_start
        if not self.scanner.done:
            new = self.body[self.scanned:]
            n = self.scanner.feed(new)
            self.scanned += n
            if n:
                out.add_call(ToolCallDelta(self.calls, arguments=new[:n]))

    def _end_call(self, out: Delta, closed: bool) -> None:
        self.inside = False
        call = _call_of(self.body, self.tools)
        if self.name_sent:  # already streaming: send what the exact span adds (nothing, once it closed)
            sent = self.body[self.args_start:self.scanned]
            if call is not None and call[1].startswith(sent) and len(call[1]) > len(sent):
                out.add_call(ToolCallDelta(self.calls, arguments=call[1][len(sent):]))
        elif call is not None:
            out.add_call(ToolCallDelta(self.calls, self.id, call[0], call[1]))
        else:
            raw = self.ws_before + self.open + self.body + (self.close if closed else "")
            self._content(out, raw)
            return
        self.calls += 1
        self.after_call, self.held_ws = True, ""



def _call_of(body: str, tools: set[str]) -> tuple[str, str] | None:
    """(name, arguments text) of a call's body, or None when it is not a call to an offered tool."""
    members = object_members(body)
    if members is None or "name" not in members or "arguments" not in members:
        return None
    name, (args, start, end) = members["name"][0], members["arguments"]
    if name not in tools or not isinstance(args, dict):
        return None
    return name, body[start:end]


def call_grammar(open_ref: str, close_ref: str, functions: Sequence[FunctionSpec], parallel: bool) -> str:
    """Lark: one tagged call (or several, one per line, when `parallel`) to one of `functions`."""
    return calls_grammar(f'{open_ref} "\\n" body "\\n" {close_ref}', "\n", functions, parallel)


def calls_grammar(call: str, separator: str, functions: Sequence[FunctionSpec], parallel: bool,
                  args_key: str = "arguments") -> str:
    """Lark: one `call` (a rule around `body`, the call's JSON object) or several joined by `separator` when
    `parallel`; body calls one of `functions`, its arguments (under `args_key`) valid against the function's
    schema, written without free whitespace."""
    rules = [f"start: call ({json.dumps(separator)} call)*" if parallel else "start: call", f"call: {call}",
             "body: " + " | ".join(f"fn_{i}" for i in range(len(functions)))]
    for i, f in enumerate(functions):
        rules.append(f"fn_{i}: %json {json.dumps(call_schema(f, args_key), ensure_ascii=False)}")
    return "\n".join(rules) + "\n"


def call_schema(f: FunctionSpec, args_key: str = "arguments") -> dict:
    """The schema of {"name": f, args_key: ...}; the arguments' definitions move to the root, where
    their `#/$defs/...` references point."""
    params = dict(f.parameters) if f.parameters else {"type": "object"}
    defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    return {"type": "object", "properties": {"name": {"const": f.name}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False, **defs, "x-guidance": JSON_OPTIONS}
