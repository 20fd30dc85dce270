"""Hermes-style calls (Qwen2.5, Hermes, many fine-tunes): `<tool_call>` tags around {"name", "arguments"}."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tuneserve.tool_calls.parser import FunctionSpec
from tuneserve.tool_calls.tagged import TaggedCallStreamer, call_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesParser:
    name = "hermes"

    def detects(self, chat_template: str) -> bool:
        return OPEN in chat_template

    def streamer(self, tool_names: Sequence[str], progressive: bool) -> TaggedCallStreamer:
        return TaggedCallStreamer(OPEN, CLOSE, tool_names, progressive)

    def grammar(self, functions: Sequence[FunctionSpec], parallel: bool, tag_ref: Callable[[str], str]) -> str:
        return call_grammar(tag_ref(OPEN), tag_ref(CLOSE), functions, parallel)

    def stop_after_call(self) -> str:
        """The text that ends a call: a stop string where only one call is wanted."""
        return CLOSE
