"""OpenAI-compatible request bodies (pydantic) and their translation into SamplingParams.

Every field is validated here, at the edge, with the bounds the engine accepts, so that the OpenAPI
schema says exactly what is accepted. Types are strict (no "5" for 5, no true for 1), floats finite and
text valid UTF-8. Bounds that depend on the server (its request limits, the model's vocabulary and
context) are checked in openai_serving / the engine and written into the schema by schema.py.

Unknown fields are a 400 (as OpenAI does), never silently ignored. Of OpenAI's fields that this server
does not implement, the harmless ones are accepted and ignored: `user`, `safety_identifier`,
`prompt_cache_key`, `metadata`, `service_tier` (hints that never change the output), `store` (false
only: nothing is kept) and `stream_options` without `stream` (nothing to act on). The legacy `functions`,
`function_call`, and `modalities` and `suffix` are accepted only with values that ask for nothing and are
otherwise a 400 saying they are not supported; `best_of`, `audio`, `prediction`, ... are refused as unknown
fields, by name (OPENAI_NOT_YET). `response_format` (text, json_object, json_schema) and vLLM's
`structured_outputs` constrain the output (server/structured.py); `tools`, `tool_choice` and
`parallel_tool_calls` call tools (server/tools.py).
"""

from __future__ import annotations

import collections
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator

from tuneserve.sampling_params import (
    FLOAT_BOUNDS,
    INT64_MAX,
    INT64_MIN,
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_STOP_CHARS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
    utf8_error,
)
from tuneserve.server.structured import ResponseFormat, StructuredOutputs, structured_params
from tuneserve.server.tools import MAX_TOOLS, AssistantToolCall, ToolChoice, ToolDefinition, ToolRequest


class APIError(Exception):
    """An error the client caused (or must wait out); rendered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 err_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        message, param = _printable(message), param if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = err_type or {400: "invalid_request_error", 401: "authentication_error",
                                 404: "not_found_error", 413: "invalid_request_error",
                                 503: "service_unavailable"}.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str) -> str:
    """text with any lone surrogate escaped, so that the error JSON can always be encoded."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _utf8(text: str) -> str:
    err = utf8_error(text)
    if err:
        raise ValueError(err)
    return text


TOKEN_KEY = r"^(0|[1-9][0-9]{0,9})$"  # a logit_bias key: a token id written as a decimal integer


def _token_key(key: object) -> object:
    """logit_bias keys arrive as JSON object keys, i.e. strings: "42" -> 42."""
    if isinstance(key, str) and re.fullmatch(TOKEN_KEY, key):
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    raise ValueError("must be token ids written as decimal integers")


def _integral(v: object) -> object:
    """JSON Schema's integer: 75.0 is one, as a JSON number with no fraction (the strict int type refuses it)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _int(**bounds: int) -> Any:
    """A strict integer type with bounds (inside the type, so that the schema says minimum/maximum)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Text = Annotated[str, AfterValidator(_utf8)]
NonEmptyText = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_utf8)]
TokenId = _int(ge=0)
Count = _int(ge=0)
Positive = _int(ge=1)
Int64 = _int(ge=INT64_MIN, le=INT64_MAX)
Logprobs = _int(ge=0, le=MAX_LOGPROBS)
TokenKey = Annotated[int, BeforeValidator(_token_key)]
LogitBias = Annotated[
    dict[TokenKey, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
    WithJsonSchema({"type": "object", "propertyNames": {"pattern": TOKEN_KEY},
                    "additionalProperties": {"type": "number", "minimum": -MAX_LOGIT_BIAS,
                                             "maximum": MAX_LOGIT_BIAS}}),
]


def _bounded(name: str) -> Any:
    """A pydantic Field with SamplingParams' bounds for the float field `name` (default None)."""
    lo, hi, open_low = FLOAT_BOUNDS[name]
    return Field(None, le=hi, **({"gt": lo} if open_low else {"ge": lo}))


LEGACY = "(the legacy form of tool calling: send tools and tool_choice instead)"


def _not_supported(why: str, allowed: tuple) -> Any:
    """A before-validator: the value must be one of `allowed` (those ask for nothing), else a 400."""

    def check(cls, v: object) -> object:  # noqa: ANN001
        if not any(type(v) is type(a) and v == a for a in allowed):  # 0.0 == False, but 0.0 is not false
            raise ValueError(f"is not supported {why}; leave it out")
        return v

    return check


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: NonEmptyText | None = None
    max_tokens: Positive | None = None
    temperature: float | None = _bounded("temperature")
    top_p: float | None = _bounded("top_p")
    top_k: _int(ge=-1) | None = None
    min_p: float | None = _bounded("min_p")
    n: _int(ge=1, le=MAX_N) = 1
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = _bounded("presence_penalty")
    frequency_penalty: float | None = _bounded("frequency_penalty")
    repetition_penalty: float | None = _bounded("repetition_penalty")
    logit_bias: LogitBias | None = None
    ignore_eos: bool = False
    min_tokens: Count = 0
    stream: bool = False
    stream_options: StreamOptions | None = None  # without stream it has nothing to act on: harmless
    priority: Int64 = 0
    # OpenAI fields that ask for nothing this server lacks (see the module docstring)
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra field

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                        tools: ToolRequest | None = None) -> SamplingParams:
        """SamplingParams for this body (and its tool calling); raises ValueError naming the bad field."""
        structured = structured_params(self.response_format, self.structured_outputs)
        stop = self.stop
        if tools is not None:
            structured = tools.merge_constraint(structured)
            stop = self.stop_list() + list(tools.stop) if tools.stop else stop
        kw: dict[str, Any] = dict(n=self.n, max_tokens=max_tokens, seed=self.seed, stop=stop,
                                  stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                                  min_tokens=self.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                                  logit_bias=self.logit_bias, structured_outputs=structured)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            v = getattr(self, name)
            if v is not None:
                kw[name] = v
        return SamplingParams(**kw)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


Prompt = (NonEmptyText | Annotated[list[NonEmptyText], Field(min_length=1)]
          | Annotated[list[TokenId], Field(min_length=1)]
          | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)])


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    logprobs: Logprobs | None = None
    echo: bool = False
    suffix: Literal[""] | None = None

    _suffix = field_validator("suffix", mode="before")(_not_supported("(no insertion mode)", (None, "")))

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Body):
    type: Literal["text"]
    text: Text

    @field_validator("type", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if v != "text":
            raise ValueError(f"must be 'text': content parts of type {v!r} are not supported yet")
        return v


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None  # passed to the chat template, which may show it
    # an assistant's calls, and the call a tool message answers; like every field, given to the template
    tool_calls: Annotated[list[AssistantToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        msg = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        msg.update({k: v for k in ("name", "tool_call_id") if (v := getattr(self, k)) is not None})
        if self.tool_calls:
            msg["tool_calls"] = [c.for_template() for c in self.tool_calls]
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Positive | None = None
    logprobs: bool | None = False
    top_logprobs: Logprobs | None = None
    add_generation_prompt: bool = True
    chat_template: Annotated[str, Field(min_length=1, max_length=1 << 17), AfterValidator(_utf8)] | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64), AfterValidator(_utf8)],
                             Annotated[str, Field(max_length=512), AfterValidator(_utf8)]],
                        Field(max_length=16)] | None = None
    store: Literal[False] | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: Annotated[list[dict], Field(max_length=0)] | None = None
    function_call: Literal["none"] | None = None
    modalities: list[Literal["text"]] | None = None

    _store = field_validator("store", mode="before")(_not_supported("(this server keeps nothing)", (None, False)))
    _functions = field_validator("functions", mode="before")(_not_supported(LEGACY, (None, [])))
    _function_call = field_validator("function_call", mode="before")(
        _not_supported(LEGACY, (None, "none")))

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if isinstance(v, list) and any(m != "text" for m in v):
            raise ValueError("other than 'text' are not supported yet; leave them out")
        return v

    def conversation(self) -> list[dict]:
        return [m.for_template() for m in self.messages]


class TokenizeMessage(ChatMessage):
    """A chat message sent to /tokenize: its own schema component, as the chat request limits (written
    into ChatMessage's schema) do not apply there."""


class TokenizeRequest(_Body):
    model: NonEmptyText | None = None
    prompt: Text = None  # null is refused, so that the schema can say "prompt or messages"
    messages: list[TokenizeMessage] = Field(None, min_length=1)
    add_special_tokens: bool = True

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    @field_validator("messages")
    @classmethod
    def _one_of(cls, v: list[TokenizeMessage], info) -> list[TokenizeMessage]:  # noqa: ANN001
        if info.data.get("prompt") is not None:
            raise ValueError("and prompt cannot both be given; send one of them")
        return v


class DetokenizeRequest(_Body):
    model: NonEmptyText | None = None
    tokens: list[TokenId]


# OpenAI fields that ask for work this server does not do (yet): refused like any unknown field, by name
OPENAI_NOT_YET = {"best_of", "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"}


# ----- pydantic errors -> one OpenAI-style 400 ------------------------------------------------------
def validation_error(errors: list[dict], body: object) -> APIError:
    """The 400 for a body that failed validation: the most specific error, its field as OpenAI names it
    (`messages[0].content`, `logit_bias`; `body` for malformed JSON) and a sentence saying what to change.

    pydantic reports errors for every alternative of a union (tagged in `loc`); the field path is rebuilt
    by walking `loc` through the body the client sent. The error chosen: a value error over a type mismatch,
    then the deepest, then one from the alternative with the fewest errors (the shape the client meant)."""
    if not errors:
        return APIError(400, "invalid request body", "body")
    walked = [_path(err, body) for err in errors]
    per_branch = collections.Counter(tags for _, tags in walked)
    best = max(range(len(errors)), key=lambda i: (not _is_type_mismatch(errors[i]), len(walked[i][0]),
                                                  -per_branch[walked[i][1]], -i))
    err, path = errors[best], walked[best][0]
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "body"
    return APIError(400, _sentence(param, err), param)


def _is_type_mismatch(err: dict) -> bool:
    return err.get("type", "").endswith("_type")


def _path(err: dict, body: object) -> tuple[list[str | int], tuple]:
    """The part of err's loc that indexes into the body (a bad dict key names its dict), and the union
    tags met on the way (which alternative the error belongs to)."""
    loc = [x for x in err.get("loc", ()) if x != "body"] if err.get("type") != "json_invalid" else []
    path: list[str | int] = []
    tags: list = []
    cur = body
    for i, part in enumerate(loc):
        if part == "[key]":
            return path[:-1], tuple(tags)
        if isinstance(cur, dict) and isinstance(part, str) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif not (err.get("type") == "missing" and i == len(loc) - 1 and isinstance(cur, dict)):
            tags.append((len(path), part))  # a union member's tag, not a place in the body
            continue
        path.append(part)
    return path, tuple(tags)


def _sentence(param: str, err: dict) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "invalid value")
    if kind == "missing":
        return f"{param} is required"
    if kind == "extra_forbidden":
        known = "is an OpenAI parameter this server does not support yet" if param in OPENAI_NOT_YET else \
            "is not a parameter of this endpoint"
        return f"{param} {known}; remove it"
    if kind == "json_invalid":
        return f"the body is not valid JSON ({(err.get('ctx') or {}).get('error', msg)})"
    if kind == "string_unicode":
        return f"{param} must be valid UTF-8 text (it holds a lone surrogate)"
    if "[key]" in err.get("loc", ()):
        param += " keys"
    elif param == "body" and kind in ("model_type", "model_attributes_type", "dict_type"):
        return "the body must be a JSON object"
    if msg.startswith("Value error, "):
        return f"{param} {msg[len('Value error, '):]}"
    should = re.match(r"^\w+ should (.*)$", msg)
    text = f"{param} must {should[1]}" if should else f"{param}: {msg}"
    text = text.replace(" after validation", "")
    value = repr(err.get("input"))
    return f"{text}, got {value if len(value) <= 80 else value[:80] + '...'}"
