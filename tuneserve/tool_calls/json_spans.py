"""Exact spans of JSON values in model text, so that a call's arguments are returned as the model wrote them
(and streamed pieces reassemble to the same string)."""

from __future__ import annotations

import json

DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def object_members(text: str) -> dict[str, tuple[object, int, int]] | None:
    """The top-level members of the JSON object `text` (surrounding whitespace allowed):
    key -> (value, start, end) with text[start:end] the value's own text. None if text is not one object."""
    i = skip_ws(text, 0)
    if not text.startswith("{", i):
        return None
    members: dict[str, tuple[object, int, int]] = {}
    i = skip_ws(text, i + 1)
    if text.startswith("}", i):
        return members if skip_ws(text, i + 1) == len(text) else None
    try:
        while True:
            key, i = DECODER.raw_decode(text, i)
            i = skip_ws(text, i)
            if not isinstance(key, str) or not text.startswith(":", i):
                return None
            start = skip_ws(text, i + 1)
            value, end = DECODER.raw_decode(text, start)
            members[key] = (value, start, end)
            i = skip_ws(text, end)
            if text.startswith(",", i):
                i = skip_ws(text, i + 1)
                continue
            if text.startswith("}", i) and skip_ws(text, i + 1) == len(text):
                return members
            return None
    except json.JSONDecodeError:
        return None


class ValueScanner:
    """Follows a JSON object or array as it arrives, character by character, and says where it ends: the
    depth of brackets outside strings, with escapes inside them."""

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped, self.done = 0, False, False, False

    def feed(self, text: str) -> int:
        """Consume text; the number of its characters that belong to the value (all, until it closes)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)
