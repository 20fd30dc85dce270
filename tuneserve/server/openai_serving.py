"""The completions and chat completions endpoints: requests in, OpenAI-shaped JSON or SSE out."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tuneserve.core.outputs import TokenLogprobs
from tuneserve.engine import PreparedRequest
from tuneserve.outputs import RequestOutput
from tuneserve.server.async_engine import AsyncEngine
from tuneserve.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from tuneserve.tokenizer import chat_prompt


def _param_of(message: str) -> str | None:
    """The field a validation message names ("temperature must be ..." -> "temperature")."""
    first = message.split(" ", 1)[0]
    return first if first.isidentifier() else None


class OpenAIServing:
    """Shared logic of the two generation endpoints."""

    def __init__(self, engine: AsyncEngine, model_name: str, max_waiting: int) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.model.max_model_len

    # ----- request preparation ---------------------------------------------------------------
    def _prepare(self, rid: str, prompt: str | list[int], body, max_tokens: int | None,  # noqa: ANN001
                 logprobs: int | None, prompt_logprobs: int | None = None) -> PreparedRequest:
        eng = self.engine.engine
        try:
            params = body.sampling_params(max_tokens, logprobs, prompt_logprobs)
            return eng.prepare_request(rid, prompt, params, priority=body.priority)
        except ValueError as e:
            raise APIError(400, str(e), _param_of(str(e))) from None

    def _check_capacity(self, n: int) -> None:
        if self.engine.num_waiting + n > self.max_waiting:
            raise APIError(503, f"the server has {self.engine.num_waiting} requests waiting (limit "
                           f"{self.max_waiting}); retry shortly", code="overloaded", headers={"Retry-After": "1"})

    # ----- completions -------------------------------------------------------------------------
    def prepare_completion(self, body: CompletionRequest) -> list[PreparedRequest]:
        if body.suffix:
            raise APIError(400, "suffix is not supported; leave it out", "suffix")
        try:
            prompts = body.prompts()
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        base = f"cmpl-{uuid.uuid4().hex}"
        reqs = [self._prepare(f"{base}-{i}", p, body, body.max_tokens, body.logprobs)
                for i, p in enumerate(prompts)]
        self._check_capacity(len(reqs))
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
    def prepare_chat(self, body: ChatCompletionRequest) -> PreparedRequest:
        try:
            ids = chat_prompt(self.tokenizer, body.conversation(), body.add_generation_prompt, body.chat_template)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # noqa: BLE001 - a template error is the client's message shape
            raise APIError(400, f"the chat template could not render these messages: {e}", "messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        req = self._prepare(f"chatcmpl-{uuid.uuid4().hex}", ids, body, max_tokens, logprobs)
        self._check_capacity(1)
        return req

    def chat_logprobs(self, lps: list[TokenLogprobs] | None) -> dict | None:
        if lps is None:
            return None

        def entry(tid: int, lp: float) -> dict:
            s = self._tok(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}

        return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                            for t in lps]}

    # ----- running ---------------------------------------------------------------------------
    async def collect(self, prepared: list[PreparedRequest], is_disconnected) -> list[RequestOutput]:  # noqa: ANN001
        """Run requests to completion; abort them all if the client goes away first."""

        async def one(p: PreparedRequest) -> RequestOutput:
            last = None
            async for last in self.engine.generate(p):  # noqa: B007
                pass
            return last  # type: ignore[return-value]

        tasks = [asyncio.create_task(one(p)) for p in prepared]
        gathered = asyncio.gather(*tasks)
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.2)
            if done:
                return gathered.result()
            if await is_disconnected():
                for t in tasks:
                    t.cancel()  # each generator's finally aborts its request
                await asyncio.gather(*tasks, return_exceptions=True)
                raise asyncio.CancelledError("client disconnected")

    async def merged(self, prepared: list[PreparedRequest]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of several requests as they come: (prompt index, output)."""
        if len(prepared) == 1:
            async for out in self.engine.generate(prepared[0]):
                yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, p: PreparedRequest) -> None:
            try:
                async for out in self.engine.generate(p):
                    await q.put((i, out))
            except BaseException as e:  # noqa: BLE001
                await q.put((i, e))
                raise
            finally:
                await q.put((i, None))

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


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    u: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                         "total_tokens": prompt + completion}
    meta = [o.metadata for o in outs if o.metadata]
    if meta:
        u["tuneserve"] = meta[0] if len(meta) == 1 else meta
    return u


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def now() -> int:
    return int(time.time())
