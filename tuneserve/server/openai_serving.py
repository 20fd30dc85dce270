"""The completions and chat completions endpoints: requests in, OpenAI-shaped JSON or SSE out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jinja2 import TemplateError

from tuneserve.chat_template import render_untrusted
from tuneserve.engine.prepared import PreparedRequest
from tuneserve.outputs import RequestOutput, TokenLogprobs
from tuneserve.sampling_params import ParamError, SamplingParams
from tuneserve.server.async_engine import AsyncEngine
from tuneserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tuneserve.server.tools import ToolPlan, ToolRequest, plan_tools
from tuneserve.tokenizer import chat_prompt
from tuneserve.tool_calls.registry import tool_call_parser

_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} | {"prompt"}


def _param_of(error: ValueError, names: dict[str, str] | None = None) -> str | None:
    """The body field an engine error is about: a ParamError's, else a field its message starts with
    ("temperature must be ..."), spelled as the endpoint spells it (`names`: chat's prompt is its messages)."""
    param = getattr(error, "param", None)
    if param is None:
        first = str(error).split(" ", 1)[0]
        param = first if first in _FIELDS else None
    return (names or {}).get(param, param)


@dataclasses.dataclass(frozen=True)
class PreparedChat:
    """A chat request ready to run, and how its output is read for tool calls (None: plain messages)."""

    request: PreparedRequest
    tools: ToolPlan | None


class OpenAIServing:
    """Shared logic of the two generation endpoints."""

    def __init__(self, engine: AsyncEngine, model_name: str, settings) -> None:  # noqa: ANN001 - ServerSettings
        self.engine = engine
        self.model_name = model_name
        self.settings = settings
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.model.max_model_len
        # the model's tool-call format (None: it renders no tools we can parse); ValueError for an unknown name
        self.tool_parser = tool_call_parser(settings.tool_call_parser, getattr(self.tokenizer, "chat_template", None))
        # tokenizing an 8 MiB prompt or rendering a template takes a while: never on the event loop
        self.pool = ThreadPoolExecutor(settings.prepare_threads, thread_name_prefix="tuneserve-prepare")

    async def admit(self, body, prepare: Callable) -> Any:  # noqa: ANN001, ANN401 - a body, what prepare returns
        """Reserve the body's sequences (n x prompts) in the waiting queue, atomically (503 with
        Retry-After when it is full), then run `prepare(body)` off the event loop. The reservation passes
        to the engine with the request, or is released here if preparation fails."""
        try:  # the server's request limits first (cheap): a request over one is a 400, not a 503
            self.settings.limits.check_body(body)
        except ParamError as e:
            raise APIError(400, str(e), e.param) from None
        seqs = num_sequences(body)
        limit = self.settings.max_waiting_requests
        if seqs > limit:
            raise APIError(400, f"this request asks for {seqs} sequences (n x prompts), more than the server's "
                           f"queue holds ({limit}, --max-waiting-requests); send fewer prompts or samples",
                           "n" if body.n > 1 else "prompt")
        if not self.engine.reserve(seqs, limit):
            raise APIError(503, f"the server has {self.engine.num_waiting} sequences waiting (limit {limit}); "
                           "retry shortly", code="overloaded", headers={"Retry-After": "1"})
        try:
            self.engine.check_available()
            return await asyncio.get_running_loop().run_in_executor(self.pool, prepare, body)
        except BaseException:
            self.engine.release(seqs)
            raise

    # ----- request preparation ---------------------------------------------------------------
    def _prepare(self, rid: str, prompt: str | list[int], body, max_tokens: int | None,  # noqa: ANN001
                 logprobs: int | None, prompt_logprobs: int | None = None,
                 names: dict[str, str] | None = None, tools: ToolRequest | None = None) -> PreparedRequest:
        eng = self.engine.engine
        try:
            params = body.sampling_params(max_tokens, logprobs, prompt_logprobs, tools)
            return eng.prepare_request(rid, prompt, params, priority=body.priority)
        except ValueError as e:  # unnamed (a KV cache too small): the request's size is what to change
            names = names or {}
            fallback = "max_tokens" if max_tokens is not None else "prompt"
            message = str(e).replace("max_tokens", names.get("max_tokens", "max_tokens"))  # as the body spells it
            raise APIError(400, message, _param_of(e, names) or names.get(fallback, fallback)) from None

    # ----- completions -------------------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> list[PreparedRequest]:
        """The body's requests, one per prompt (its limits were checked by `admit`)."""
        prompts = body.prompts()
        base = f"cmpl-{uuid.uuid4().hex}"
        reqs = [self._prepare(f"{base}-{i}", p, body, body.max_tokens, body.logprobs)
                for i, p in enumerate(prompts)]
        return reqs

    def completion_choice(self, out: RequestOutput, prompt_index: int, n: int, echo: bool,
                          want_logprobs: bool) -> list[dict]:
        choices = []
        for c in out.outputs:
            text = (out.prompt or "") + c.text if echo else c.text
            choices.append({"index": prompt_index * n + c.index, "text": text,
                            "logprobs": self._completion_logprobs(c.logprobs) if want_logprobs else None,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return choices

    def _completion_logprobs(self, lps: list[TokenLogprobs] | None, offset: int = 0) -> dict | None:
        if lps is None:
            return None
        toks = [self._tok(t.token_id) for t in lps]
        offsets, pos = [], offset
        for t in toks:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": [t.logprob for t in lps],
                "top_logprobs": [{self._tok(i): lp for i, lp in t.top} for t in lps], "text_offset": offsets}

    def _tok(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ----- chat ------------------------------------------------------------------------------
    def prepare_chat(self, body: ChatCompletionRequest) -> PreparedChat:
        """The conversation's request (its limits were checked by `admit`)."""
        try:
            tools = self._tool_request(body)
        except ParamError as e:
            raise APIError(400, str(e), e.param) from None
        try:
            ids = self._chat_ids(body, tools.template_tools)
        except APIError:
            raise
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # noqa: BLE001 - a template error is the client's message shape
            raise APIError(400, f"the chat template could not render these messages: {e}", "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.max_tokens is not None and body.max_tokens > self.max_model_len:  # refused even when overridden
            raise APIError(400, f"max_tokens ({body.max_tokens}) exceeds the model's context ({self.max_model_len}); "
                           "lower it", "max_tokens")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        names = {"prompt": "messages", "logprobs": "top_logprobs",
                 "max_tokens": "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"}
        request = self._prepare(f"chatcmpl-{uuid.uuid4().hex}", ids, body, max_tokens, logprobs, names=names,
                                tools=tools)
        return PreparedChat(request, tools.plan)

    def _tool_request(self, body: ChatCompletionRequest) -> ToolRequest:
        """What the body's tool fields ask; a request's own template brings its own call format."""
        parser = self.tool_parser
        if body.chat_template and body.tools and self.settings.tool_call_parser == "auto":
            parser = tool_call_parser("auto", body.chat_template)
        return plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, parser, self.tokenizer)

    def _chat_ids(self, body: ChatCompletionRequest, tools: list[dict] | None) -> list[int]:
        """The conversation's token ids: the model's template, or (if the operator allows it) the
        request's own, rendered in a time- and size-limited sandbox."""
        if not body.chat_template:
            return chat_prompt(self.tokenizer, body.conversation(), body.add_generation_prompt, tools=tools)
        if not self.settings.trust_request_chat_template:
            raise APIError(400, "this server does not render chat templates sent in requests; leave out "
                           "chat_template (the operator can allow it with --trust-request-chat-template)",
                           "chat_template")
        tok = self.tokenizer
        special = {k: getattr(tok, k) or "" for k in ("bos_token", "eos_token")}
        try:
            text = render_untrusted(body.chat_template, body.conversation(), body.add_generation_prompt, special,
                                    tools=tools)
        except TemplateError as e:
            raise APIError(400, f"chat_template: {e}", "chat_template") from None
        return tok(text, add_special_tokens=False).input_ids

    def chat_logprobs(self, lps: list[TokenLogprobs] | None) -> dict | None:
        if lps is None:
            return None

        def entry(tid: int, lp: float) -> dict:
            s = self._tok(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in lps]}

    # ----- running ---------------------------------------------------------------------------
    async def collect(self, prepared: list[PreparedRequest], is_disconnected) -> list[RequestOutput] | None:  # noqa: ANN001
        """Run requests to completion (final outputs only). Returns None, with every request aborted, if
        the client goes away first; raises RequestFailedError if the engine fails one (the others are
        aborted too: the response can only be an error)."""

        async def one(p: PreparedRequest) -> RequestOutput:
            p.parent.output_kind = "final"
            last = None
            async for last in self.engine.generate(p, reserved=p.params.n):  # noqa: B007
                pass
            return last  # type: ignore[return-value]

        tasks = [asyncio.create_task(one(p)) for p in prepared]
        try:
            while True:
                done, _ = await asyncio.wait(tasks, timeout=0.2, return_when=asyncio.FIRST_EXCEPTION)
                if any(t.done() and not t.cancelled() and t.exception() is not None for t in done):
                    raise next(t.exception() for t in done if not t.cancelled() and t.exception() is not None)
                if len(done) == len(tasks):
                    return [t.result() for t in tasks]
                if await is_disconnected():
                    return None
        finally:
            for t in tasks:
                t.cancel()  # each generator's finally aborts its request (a no-op for finished ones)
            await asyncio.gather(*tasks, return_exceptions=True)

    async def merged(self, prepared: list[PreparedRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Delta outputs of several requests as they come: (prompt index, output). An error in one ends
        them all (the others are aborted)."""
        for p in prepared:
            p.parent.output_kind = "delta"
        if len(prepared) == 1:
            async for out in self.engine.generate(prepared[0], reserved=prepared[0].params.n):
                yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, p: PreparedRequest) -> None:
            try:
                async for out in self.engine.generate(p, reserved=p.params.n):
                    q.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prepared)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await q.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def num_sequences(body) -> int:  # noqa: ANN001 - a completion or chat body
    """Sequences a body asks for: n samples of each of its prompts."""
    p = getattr(body, "prompt", None)
    prompts = len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1
    return max(1, body.n) * prompts


def usage(outs: list[RequestOutput], completion: int | None = None) -> dict:
    """OpenAI's usage block for final outputs (`completion`: the count, when the outputs were deltas)."""
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    if completion is None:
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    # prefix-cache hits as OpenAI reports them, so a client sees what caching (and replica routing) bought it
    cached = sum(o.num_cached_tokens for o in outs)
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": cached}}
    meta = [o.metadata for o in outs if o.metadata]
    if meta:
        u["tuneserve"] = meta[0] if len(meta) == 1 else meta
    return u


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def now() -> int:
    return int(time.time())
