"""What a tool-call parser gives and takes: calls, streamed deltas, the functions a grammar may call, and the
interface each model family's parser implements."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class FunctionSpec:
    """A function the model may call: its name and the JSON schema of its arguments (None: any object)."""

    name: str
    parameters: dict | None = None


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as the model wrote it


@dataclass
class ToolCallDelta:
    """A piece of the call at `index`: its id and name come first, once; then pieces of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    """What one piece of model text adds to the message: content, and pieces of tool calls."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, piece: ToolCallDelta) -> None:
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == piece.index:  # one entry per call in a chunk
            last.id, last.name = last.id or piece.id, last.name or piece.name
            last.arguments += piece.arguments
        else:
            self.calls.append(piece)

    def extend(self, other: Delta) -> None:
        self.content += other.content
        for piece in other.calls:
            self.add_call(piece)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


@dataclass
class ParsedMessage:
    content: str | None  # None when the model only called tools
    calls: list[ToolCall]


def assemble(deltas: Iterable[Delta]) -> ParsedMessage:
    """The message that a stream of deltas adds up to (what a client reassembles)."""
    content, calls = "", {}
    for d in deltas:
        content += d.content
        for piece in d.calls:
            call = calls.setdefault(piece.index, ToolCall(piece.id or "", piece.name or "", ""))
            call.id, call.name = call.id or piece.id or "", call.name or piece.name or ""
            call.arguments += piece.arguments
    ordered = [calls[i] for i in sorted(calls)]
    return ParsedMessage(content if content or not ordered else None, ordered)


class CallStreamer(Protocol):
    """Parses one choice's text as it arrives."""

    def feed(self, text: str) -> Delta: ...

    def finish(self) -> Delta:
        """The rest, once the text is complete (an unclosed call is parsed as it stands)."""
        ...


class ToolCallParser(Protocol):
    """One model family's tool-call format."""

    name: str

    def detects(self, chat_template: str) -> bool:
        """Whether a chat template writes tool calls in this format."""
        ...

    def streamer(self, tool_names: Sequence[str], progressive: bool) -> CallStreamer:
        """A parser for one choice. `progressive`: output follows the call grammar (tool_choice required or
        named), so arguments can be streamed as written; otherwise each call is sent once it parses."""
        ...

    def grammar(self, functions: Sequence[FunctionSpec], parallel: bool, tag_ref) -> str:  # noqa: ANN001
        """A Lark grammar (llguidance's dialect) of one call to one of `functions`, or several when
        `parallel`. `tag_ref(tag)` spells a tag as a grammar terminal (its token where it is one)."""
        ...

    def stop_after_call(self) -> str:
        """The text that ends a call: a stop string where at most one call is wanted."""
        ...


def parse(parser: ToolCallParser, text: str, tool_names: Sequence[str], progressive: bool) -> ParsedMessage:
    """A finished text's message: the streamer fed all at once, so that streams and whole responses agree."""
    s = parser.streamer(tool_names, progressive)
    return assemble([s.feed(text), s.finish()])
