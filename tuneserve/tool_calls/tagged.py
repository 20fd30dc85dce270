"""Calls written as tags around a JSON object with a name and arguments:
`<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>` (hermes, as Qwen2.5's template writes them).

Content outside the tags streams as it comes, holding back only what may be the start of a tag. Whitespace
around calls is dropped. A call whose body does not parse (or names no offered tool) is content, as written.
Small models often write a lone call without its tags (Qwen2.5-Coder-0.5B does); unconstrained output that
begins with "{" is therefore held until it ends, and is a call if it is one.
"""

from __future__ import annotations

from collections.abc import Sequence

from tuneserve.tool_calls.call_grammar import calls_grammar
from tuneserve.tool_calls.call_object import CallObjectStream, call_of
from tuneserve.tool_calls.parser import Delta, FunctionSpec, ToolCallDelta, new_call_id


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
            call = call_of(text, self.tools)
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
        self.inside, self.call = True, CallObjectStream(self.calls, self.tools)

    def _body(self, out: Delta, text: str) -> None:
        self.call.add(text)
        if self.progressive:
            self.call.stream(out)

    def _end_call(self, out: Delta, closed: bool) -> None:
        self.inside = False
        if not self.call.end(out):  # not a call: the tags and the body are content, as written
            self._content(out, self.ws_before + self.open + self.call.body + (self.close if closed else ""))
            return
        self.calls += 1
        self.after_call, self.held_ws = True, ""


def call_grammar(open_ref: str, close_ref: str, functions: Sequence[FunctionSpec], parallel: bool) -> str:
    """Lark: one tagged call (or several, one per line, when `parallel`) to one of `functions`."""
    return calls_grammar(f'{open_ref} "\\n" body "\\n" {close_ref}', "\n", functions, parallel)
