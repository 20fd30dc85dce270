"""Server-sent event streams for completions and chat completions, built from the engine's delta outputs.

Each chunk carries only what is new, so a stream's work is linear in its output. Whatever ends a stream
early (an engine error for one of its requests, the server's time limit, the engine's death) becomes an
error event before `[DONE]`; a client that goes away closes the generator, whose cleanup aborts its
requests. `GuardedBody` covers the one case a generator's cleanup cannot: a response whose body was never
started (the client left before the first byte), whose admission it releases.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from tuneserve.server.async_engine import EngineDeadError, RequestFailedError
from tuneserve.server.openai_serving import OpenAIServing, PreparedChat, now, sse, usage
from tuneserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tuneserve.server.tools import delta_json, finish_reason

logger = logging.getLogger("tuneserve.server")


class GuardedBody:
    """An SSE body iterator that runs `on_unstarted` if it is dropped before its first chunk."""

    def __init__(self, body: AsyncIterator[str], on_unstarted: Callable[[], None]) -> None:
        self.body, self.on_unstarted, self.started = body, on_unstarted, False

    def __aiter__(self) -> GuardedBody:
        return self

    async def __anext__(self) -> str:
        self.started = True
        return await self.body.__anext__()

    def __del__(self) -> None:
        if not self.started:
            self.on_unstarted()


def error_event(e: BaseException, limit_s: float) -> str:
    """The SSE error event for what ended a stream early."""
    if isinstance(e, RequestFailedError):
        err = APIError(e.error.status, e.error.message, code="engine_error")
    elif isinstance(e, TimeoutError):
        err = APIError(504, f"the request ran past the server's limit of {limit_s:g} s "
                       "(--max-request-seconds); ask for fewer tokens", code="timeout")
    elif isinstance(e, EngineDeadError):
        err = APIError(503, str(e), code="engine_dead")
    else:
        logger.exception("stream failed")
        err = APIError(500, f"internal error: {type(e).__name__}: {e}")
    return sse(err.body())


async def completion_events(serving: OpenAIServing, body: CompletionRequest, prepared, limit_s: float):  # noqa: ANN001, ANN201
    """The SSE stream of a /v1/completions request (several prompts and n samples interleave)."""
    rid = prepared[0].parent.request_id.rsplit("-", 1)[0]
    created, finals, started, completion = now(), {}, set(), 0

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": serving.model_name,
                    "choices": choices, **extra})

    try:
        async with asyncio.timeout(limit_s):
            async for i, out in serving.merged(prepared):
                choices = []
                for c in out.outputs:
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    text = c.text
                    if body.echo and (i, c.index) not in started:
                        text = (out.prompt or "") + text
                    started.add((i, c.index))
                    completion += len(c.token_ids)
                    lps = serving._completion_logprobs(c.logprobs) if body.logprobs is not None and c.logprobs \
                        else None
                    choices.append({"index": i * body.n + c.index, "text": text, "logprobs": lps,
                                    "finish_reason": c.finish_reason})
                if choices:
                    yield chunk(choices)
                if out.finished:
                    finals[i] = out
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=usage(list(finals.values()), completion))
    except Exception as e:  # noqa: BLE001 - told to the client before the stream closes
        yield error_event(e, limit_s)
    yield sse("[DONE]")


async def chat_events(serving: OpenAIServing, body: ChatCompletionRequest, chat: PreparedChat, limit_s: float):  # noqa: ANN201
    """The SSE stream of a /v1/chat/completions request; tool calls stream as OpenAI streams them (a call's
    id and name first, then pieces of its arguments)."""
    rid = chat.request.parent.request_id
    created, final, completion = now(), None, 0
    streamers = [chat.tools.streamer() for _ in range(body.n)] if chat.tools is not None else None
    called = [False] * body.n

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": serving.model_name,
                    "choices": choices, **extra})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(body.n)])
    try:
        async with asyncio.timeout(limit_s):
            async for _, out in serving.merged([chat.request]):
                choices = []
                for c in out.outputs:
                    completion += len(c.token_ids)
                    if not c.text and not c.token_ids and c.finish_reason is None:
                        continue
                    lps = serving.chat_logprobs(c.logprobs) if body.logprobs and c.logprobs else None
                    reason = c.finish_reason
                    if streamers is None:
                        delta = {"content": c.text} if c.text else {}
                    else:
                        d = streamers[c.index].feed(c.text)
                        if reason is not None:
                            d.extend(streamers[c.index].finish())
                        called[c.index] = called[c.index] or bool(d.calls)
                        delta, reason = delta_json(d.content, d.calls), finish_reason(reason, called[c.index])
                    choices.append({"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": reason})
                if choices:
                    yield chunk(choices)
                final = out
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield chunk([], usage=usage([final], completion))
    except Exception as e:  # noqa: BLE001 - told to the client before the stream closes
        yield error_event(e, limit_s)
    yield sse("[DONE]")
