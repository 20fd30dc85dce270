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

from pydantic import Field

from tuneserve.sampling_params import ParamError, StructuredOutputsParams
from tuneserve.server.structured import StrictModel
from tuneserve.tool_calls.parser import CallStreamer, FunctionSpec, ParsedMessage, ToolCallParser, parse

MAX_TOOLS = 128
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionDefinition(StrictModel):
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments; none: any object
    strict: bool | None = None  # constrained calls always follow the schema here


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
    arguments: str  # JSON, as the model wrote it (which OpenAI does not promise is valid)


class AssistantToolCall(StrictModel):
    """A call the assistant made earlier in the conversation."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: CalledFunction

    def for_template(self) -> dict:
        """As chat templates read it: arguments as an object (templates write them with tojson), or as the
        string they are where they do not parse."""
        try:
            args = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            args = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": args}}


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
