"""Tool-call parsers by name, and the one a chat template implies."""

from __future__ import annotations

from tuneserve.tool_calls.hermes import HermesParser
from tuneserve.tool_calls.llama3_json import Llama3JsonParser
from tuneserve.tool_calls.parser import ToolCallParser

PARSERS: dict[str, ToolCallParser] = {p.name: p for p in (HermesParser(), Llama3JsonParser())}


def tool_call_parser(name: str, chat_template: str | None) -> ToolCallParser | None:
    """`name` ("auto": the parser whose format the template writes; "none": no tool calling), or None when the
    template renders no tools or writes no format we know. ValueError for an unknown name."""
    if name == "none":
        return None
    if name != "auto":
        if name not in PARSERS:
            raise ValueError(f"unknown tool-call parser {name!r}; known: {sorted(PARSERS)}")
        return PARSERS[name]
    if not chat_template or "tools" not in chat_template:
        return None
    return next((p for p in PARSERS.values() if p.detects(chat_template)), None)
