"""OpenAI's tool calling: `tools`, `tool_choice` and `parallel_tool_calls` on chat requests, the assistant's
`tool_calls` in the conversation, and what they mean for a generation.

The model's own chat template renders the tools. `tool_choice` "none" leaves them out of the prompt (the
model writes a message); "auto" parses whatever calls the model writes; "required" and a named function
constrain the output with the parser's call grammar, so that arguments always match their schema. Where
`parallel_tool_calls` is false, "auto" stops after the first call and the grammar allows only one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator

from tuneserve.sampling_params import ParamError, StructuredOutputsParams, utf8_error
from tuneserve.server.structured import StrictModel
from tuneserve.tool_calls.parser import CallStreamer, FunctionSpec, ParsedMessage, ToolCallParser, parse

MAX_TOOLS = 128
# how deeply a function's parameters schema (or a call's arguments) may nest, objects and arrays: real ones
# nest a few levels, and templates, JSON encoders and the grammar compiler recurse through them
MAX_SCHEMA_DEPTH = 64
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _utf8(text: str) -> str:
    """protocol.Text's check (protocol imports this module): text a tokenizer takes, with no lone surrogate."""
    err = utf8_error(text)
    if err:
        raise ValueError(err)
    return text


Text = Annotated[str, AfterValidator(_utf8)]


def json_depth(value: object, limit: int) -> int:
    """How deeply a JSON value nests (a scalar 0, [] 1), counted up to limit + 1, without recursing: the value
    may nest deeper than Python can recurse."""
    deepest, stack = 0, [(value, 0)]
    while stack and deepest <= limit:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is not None:
            deepest = max(deepest, depth + 1)
            stack.extend((c, depth + 1) for c in children)
    return deepest


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: Text | None = None
    # a JSON schema of the arguments (none: any object); the schema says what it can of the checks below
    parameters: Annotated[dict, Field(json_schema_extra={"properties": {"type": {"const": "object"}}})] | None = None
    strict: bool | None = None  # constrained calls always follow the schema here

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        if json_depth(v, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"must nest at most {MAX_SCHEMA_DEPTH} levels deep")
        if v.get("type", "object") != "object":  # a call's arguments are an object (OpenAI says the same)
            raise ValueError(f"must be the JSON schema of an object (type 'object'), got type {v['type']!r}")
        err = utf8_error(json.dumps(v, ensure_ascii=False))
        if err:
            raise ValueError("must be valid UTF-8 text, but holds a lone surrogate")
        return v


class ToolDefinition(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionRef(StrictModel):
    name: FunctionName


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionRef


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(StrictModel):
    name: FunctionName
    arguments: Text  # JSON, as the model wrote it (which OpenAI does not promise is valid)


class AssistantToolCall(StrictModel):
    """A call the assistant made earlier in the conversation."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: CalledFunction

    def for_template(self) -> dict:
        """As chat templates read it: arguments as an object (templates write them with tojson)."""
        args = template_arguments(self.function.arguments)
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": args}}


def template_arguments(text: str) -> object:
    """Arguments as a template reads them: their JSON value, or the string as written where the value would
    not render (not JSON; nested past Python's recursion; an integer too long to convert; an escaped lone
    surrogate, which no tokenizer takes; nested deeper than a template may recurse), as a model may have cut
    or garbled them."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeEncodeError are ValueErrors
        return text
    return value if json_depth(value, MAX_SCHEMA_DEPTH) <= MAX_SCHEMA_DEPTH else text


@dataclass(frozen=True)
class ToolPlan:
    """How one request's output is read for tool calls."""

    parser: ToolCallParser
    names: tuple[str, ...]
    constrained: bool  # required / named: the output follows the call grammar

    def streamer(self) -> CallStreamer:
        return self.parser.streamer(self.names, self.constrained)

    def message(self, text: str) -> ParsedMessage:
        return parse(self.parser, text, self.names, self.constrained)


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" where the model stopped after calling a tool."""
    return "tool_calls" if called and reason == "stop" else reason


@dataclass(frozen=True)
class ToolRequest:
    """What a request's tool fields ask of the prompt and the generation."""

    template_tools: list[dict] | None  # rendered by the chat template
    plan: ToolPlan | None  # None: the output is a plain message
    constraint: StructuredOutputsParams | None = None
    stop: tuple[str, ...] = ()

    def merge_constraint(self, other: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
        """The generation's one constraint; a request cannot both call tools and fix its message's format."""
        if self.plan is not None and other is not None:
            raise ParamError(other.field, f"{other.field} cannot be combined with tools unless tool_choice is "
                             "'none'; leave one out")
        return self.constraint or other


def plan_tools(tools: Sequence[ToolDefinition] | None, choice: ToolChoice | None, parallel: bool | None,
               parser: ToolCallParser | None, tokenizer) -> ToolRequest:  # noqa: ANN001 - an HF tokenizer
    """The request's ToolRequest; ParamError naming the field that cannot be honoured."""
    tools = list(tools or [])
    choice = choice if choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none":
            raise ParamError("tool_choice", "tool_choice needs tools; send tools or leave tool_choice out")
        return ToolRequest(None, None)
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ParamError("tools", "tools must have distinct function names")
    if choice == "none":
        return ToolRequest(None, None)
    if parser is None:
        raise ParamError("tools", "this model's chat template does not render tools in a format this server "
                         "parses; start the server with --tool-call-parser NAME, or leave tools out")
    template_tools = [t.model_dump(exclude_none=True) for t in tools]
    plan = ToolPlan(parser, tuple(names), constrained=choice != "auto")
    one = parallel is False
    if choice == "auto":
        return ToolRequest(template_tools, plan, stop=(parser.stop_after_call(),) if one else ())
    wanted = tools
    if isinstance(choice, NamedToolChoice):
        wanted = [t for t in tools if t.function.name == choice.function.name]
        if not wanted:
            raise ParamError("tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools")
        one = True
    functions = [FunctionSpec(t.function.name, t.function.parameters) for t in wanted]
    grammar = parser.grammar(functions, not one, lambda tag: _tag_ref(tokenizer, tag))
    return ToolRequest(template_tools, plan, StructuredOutputsParams(grammar=grammar, field="tools"))


def _tag_ref(tokenizer, tag: str) -> str:  # noqa: ANN001
    """A tag as a grammar terminal: its token where the vocabulary has it as one, else its text."""
    ids = tokenizer.encode(tag, add_special_tokens=False)
    return f"<[{ids[0]}]>" if len(ids) == 1 else json.dumps(tag)


def chat_message(plan: ToolPlan | None, text: str, reason: str | None) -> dict:
    """A finished choice's message and finish reason."""
    if plan is None:
        return {"message": {"role": "assistant", "content": text}, "finish_reason": reason}
    parsed = plan.message(text)
    return {"message": message_json(parsed), "finish_reason": finish_reason(reason, bool(parsed.calls))}


def message_json(parsed: ParsedMessage) -> dict:
    """The assistant message of a response."""
    msg: dict = {"role": "assistant", "content": parsed.content}
    if parsed.calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in parsed.calls]
    return msg


def delta_json(content: str, calls) -> dict:  # noqa: ANN001 - list[ToolCallDelta]
    """A stream chunk's delta."""
    delta: dict = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = [
            {"index": c.index, **({"id": c.id, "type": "function"} if c.id else {}),
             "function": {**({"name": c.name} if c.name is not None else {}), "arguments": c.arguments}}
            for c in calls]
    return delta
