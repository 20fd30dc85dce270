"""The served OpenAPI document: what each route answers and the bounds of this server's requests.

FastAPI documents the routes' request bodies but not what they send back (they return JSONResponse
or SSE), and it documents a 422 where the error handlers send OpenAI's 400. This module adds the response
bodies, the error statuses with OpenAI's error body, and the bounds that only the running server knows:
its request limits, the model's name, vocabulary and context length. So a client, or a fuzzer, reads
exactly what the server accepts and returns.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from tuneserve.server.limits import RequestLimits


# ----- response bodies --------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache (whole KV blocks)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    tuneserve: dict | list[dict] | None = None  # what an overflow policy did to the prompt


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class MessageFunction(BaseModel):
    name: str
    arguments: str  # JSON text as the model wrote it (cut short where the output was)


class MessageToolCall(BaseModel):
    id: str
    type: str
    function: MessageFunction


class AssistantMessage(BaseModel):
    role: str
    content: str | None  # null when the model only called tools
    tool_calls: list[MessageToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChunkFunction(BaseModel):
    name: str | None = None  # in a call's first piece only
    arguments: str


class ChunkToolCall(BaseModel):
    """A piece of the call at `index`: its id, type and name come once, first; then pieces of arguments."""

    index: int
    id: str | None = None
    type: str | None = None
    function: ChunkFunction


class ChatDelta(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


_CHUNKS = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}
_GENERATE = (400, 401, 404, 413, 503)
# path -> (200 body model or media type, the error statuses the route can send)
_ROUTES: dict[str, tuple[Any, tuple[int, ...]]] = {
    "/v1/completions": (CompletionResponse, _GENERATE),
    "/v1/chat/completions": (ChatCompletionResponse, _GENERATE),
    "/tokenize": (TokenizeResponse, _GENERATE),
    "/detokenize": (DetokenizeResponse, _GENERATE),
    "/v1/models": (ModelList, (401, 503)),
    "/version": (VersionResponse, ()),
    "/health": (None, (503,)),
    "/metrics": ("text/plain", (503,)),
}
_ERROR_TEXT = {400: "invalid request: `param` names the field", 401: "missing or invalid API key",
               404: "unknown model", 413: "request body too large", 503: "loading, overloaded or engine down"}


def document_responses(schema: dict) -> None:
    """Replace FastAPI's placeholder responses by what each route really sends."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    comps.pop("HTTPValidationError", None), comps.pop("ValidationError", None)
    _add_model(comps, ErrorResponse)
    for path, (ok, errors) in _ROUTES.items():
        for op in schema.get("paths", {}).get(path, {}).values():
            op["responses"] = {"200": _ok_response(comps, ok, _CHUNKS.get(path))}
            for status in errors:
                op["responses"][str(status)] = {"description": _ERROR_TEXT[status], "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


def _ok_response(comps: dict, ok: Any, chunk: type[BaseModel] | None) -> dict:
    if ok is None:
        return {"description": "ready"}
    if isinstance(ok, str):
        return {"description": "OK", "content": {ok: {"schema": {"type": "string"}}}}
    content = {"application/json": {"schema": _add_model(comps, ok)}}
    if chunk is not None:  # with "stream": true: server-sent events of chunks (or an error), then [DONE]
        payload = {"anyOf": [_add_model(comps, chunk), {"$ref": "#/components/schemas/ErrorResponse"}]}
        data = {"anyOf": [{"const": "[DONE]"}, {"not": {"const": "[DONE]"}, "contentMediaType": "application/json",
                                               "contentSchema": payload}]}
        content["text/event-stream"] = {"schema": {"type": "object", "required": ["data"],
                                                   "properties": {"data": data}}}
    return {"description": "OK", "content": content}


def _add_model(comps: dict, model: type[BaseModel]) -> dict:
    """Put model (and the models it uses) into components; return a $ref to it."""
    js = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, component in [*js.pop("$defs", {}).items(), (model.__name__, js)]:
        # one name, one schema: a response model named like a request model would replace its schema,
        # and clients and fuzzers would read the wrong bounds for the request
        if comps.setdefault(name, component) != component:
            raise ValueError(f"two schemas are named {name!r}; rename one of the models")
    return {"$ref": f"#/components/schemas/{model.__name__}"}


# ----- request bounds known only at run time -----------------------------------------------------
def bound_requests(schema: dict, limits: RequestLimits, model_name: str | None = None, vocab: int | None = None,
                   max_model_len: int | None = None, request_templates: bool = True) -> None:
    """Write the server's limits (and, once the model is loaded, its name, vocabulary and context length)
    into the request schemas, so that what the schema allows is what the server accepts."""
    comps = schema.get("components", {}).get("schemas", {})
    chat = comps.get("ChatCompletionRequest", {}).get("properties", {})
    if not request_templates and "chat_template" in chat:  # the operator has not allowed them
        chat["chat_template"] = {"type": "null", "default": None, "title": "Chat Template"}
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps.get(name, {}).get("properties", {})
        _set(props.get("n"), "integer", maximum=limits.max_n)
        _set(props.get("stop"), "string", maxLength=limits.max_stop_chars)
        _set(props.get("stop"), "array", maxItems=limits.max_stop)
        _set(_items(props.get("stop")), "string", maxLength=limits.max_stop_chars)
        _set(props.get("stop_token_ids"), "array", maxItems=limits.max_stop_token_ids)
        _set(props.get("logit_bias"), "object", maxProperties=limits.max_logit_bias)
    prompt = comps.get("CompletionRequest", {}).get("properties", {}).get("prompt")
    _set(prompt, "string", maxLength=limits.max_prompt_chars)
    for b in _branches(prompt):  # lists of prompts (a list of token ids is one prompt)
        if b.get("type") == "array" and b.get("items", {}).get("type") != "integer":
            b["maxItems"] = limits.max_prompts
    _set(_items(prompt), "string", maxLength=limits.max_prompt_chars)
    _set(comps.get("ChatCompletionRequest", {}).get("properties", {}).get("messages"), "array",
         maxItems=limits.max_messages)
    content = comps.get("ChatMessage", {}).get("properties", {}).get("content")
    _set(content, "string", maxLength=limits.max_prompt_chars)
    for name in ("CompletionRequest", "ChatCompletionRequest", "TokenizeRequest", "DetokenizeRequest"):
        props = comps.get(name, {}).get("properties", {})
        if model_name is not None:
            _set(props.get("model"), "string", enum=[model_name])
        if vocab is not None:
            _bound_token_ids(props, vocab)
        if max_model_len is not None:
            for field in ("max_tokens", "max_completion_tokens", "min_tokens"):
                _set(props.get(field), "integer", maximum=max_model_len)


def _bound_token_ids(props: dict, vocab: int) -> None:
    _set(props.get("top_k"), "integer", maximum=vocab)
    _set(props.get("logit_bias"), "object", propertyNames={"pattern": below_pattern(vocab)})
    for field in ("stop_token_ids", "tokens"):
        _set(_items(props.get(field)), "integer", maximum=vocab - 1)
    prompt_items = _items(props.get("prompt"))
    _set(prompt_items, "integer", maximum=vocab - 1)
    _set(_items(prompt_items), "integer", maximum=vocab - 1)


def below_pattern(n: int) -> str:
    """A regex for the decimal integers in [0, n), written without leading zeros (logit_bias keys)."""
    top = str(n - 1)
    alts = ["0"] if n > 0 else []
    if len(top) > 1:
        alts.append(f"[1-9][0-9]{{0,{len(top) - 2}}}")  # fewer digits than n - 1
    for i, d in enumerate(top):  # as many digits: n - 1's first i digits, then a smaller one
        low = 1 if i == 0 else 0
        if int(d) > low:
            digit = str(low) if int(d) - 1 == low else f"[{low}-{int(d) - 1}]"
            rest = len(top) - i - 1
            alts.append(top[:i] + digit + (f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(top)
    return "^(" + "|".join(dict.fromkeys(alts)) + ")$"


def _branches(prop: dict | list | None) -> list[dict]:
    """The alternatives of a property schema (its anyOf members, or itself), flattened over lists."""
    if prop is None:
        return []
    if isinstance(prop, list):
        return [b for p in prop for b in _branches(p)]
    return [b for alt in prop["anyOf"] for b in _branches(alt)] if "anyOf" in prop else [prop]


def _items(prop: dict | list | None) -> list[dict]:
    """The item schemas of the array alternatives of prop."""
    return [b["items"] for b in _branches(prop) if b.get("type") == "array" and "items" in b]


def _set(prop: dict | list | None, kind: str, **keys: Any) -> None:
    """Set keys on every alternative of prop whose type is `kind`."""
    for b in _branches(prop):
        if b.get("type") == kind:
            b.update(keys)


def server_openapi(base: dict, settings, engine=None, model_name: str | None = None,  # noqa: ANN001
                   tool_calls: bool = True) -> dict:
    """The OpenAPI document of a server (its ServerSettings; the LLMEngine once loaded; whether its model
    calls tools): FastAPI's `base` with the responses and the run-time bounds added."""
    schema = copy.deepcopy(base)
    document_responses(schema)
    model = engine.config.model if engine is not None else None
    bound_requests(schema, settings.limits, model_name if engine is not None else None,
                   model.arch.vocab_size if model else None, model.max_model_len if model else None,
                   getattr(settings, "trust_request_chat_template", True))
    if not tool_calls:
        no_tools(schema)
    return schema


def no_tools(schema: dict) -> None:
    """A model that calls no tools takes no tools, and no tool_choice but "none"."""
    chat = schema.get("components", {}).get("schemas", {}).get("ChatCompletionRequest", {}).get("properties", {})
    if "tools" in chat:
        chat["tools"] = {"anyOf": [{"type": "array", "maxItems": 0}, {"type": "null"}], "default": None}
    if "tool_choice" in chat:
        chat["tool_choice"] = {"anyOf": [{"enum": ["none"]}, {"type": "null"}], "default": None}
