"""One OpenAI-style request as its client saw it: status, text per choice, chunk times and how it ended.

`bench soak` and `bench overload` send every request through `send`; `sse_events` is also how `bench serve`
reads a stream. Nothing here raises for a bad answer: the `Exchange` records it, so one request never ends a
benchmark. Cancelling `send` (an abort, a client timeout) leaves the partial `Exchange` the caller passed in.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


@dataclass
class Exchange:
    """What came back for one request; times are perf_counter seconds."""

    sent: float = 0.0
    status: int | None = None  # None: no response headers arrived
    retry_after: str | None = None
    texts: dict[int, str] = field(default_factory=dict)  # choice index -> text (streamed deltas joined)
    finish: dict[int, str | None] = field(default_factory=dict)  # choice index -> finish_reason
    chunk_s: list[float] = field(default_factory=list)  # seconds from send of each chunk that carried choices
    usage: dict | None = None
    done: bool = False  # the whole answer arrived: [DONE], or a JSON body
    closed_early: bool = False  # we hung up on purpose after stop_after chunks
    error: str | None = None
    ended: float | None = None

    @property
    def latency(self) -> float | None:
        """Send to the end of the response (to the status line for an error answer)."""
        return None if self.ended is None else self.ended - self.sent

    @property
    def ttft(self) -> float | None:
        return self.chunk_s[0] if self.chunk_s else None

    def complete(self, num_choices: int) -> bool:
        """A whole, error-free answer with a finish_reason for each of the num_choices choices."""
        return (self.done and self.error is None and self.status == 200
                and all(self.finish.get(i) is not None for i in range(num_choices)))


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON objects of a server-sent-event stream, then None for its closing `[DONE]`."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            yield None
            return
        yield json.loads(data)


def _add_choice(ex: Exchange, choice: dict) -> None:
    """Append one choice's text, whichever endpoint and shape (completion, chat delta, chat message)."""
    idx = int(choice.get("index", 0))
    if "text" in choice:
        text = choice["text"]
    else:
        text = (choice.get("delta") or choice.get("message") or {}).get("content")
    ex.texts[idx] = ex.texts.get(idx, "") + (text or "")
    if choice.get("finish_reason") is not None or idx not in ex.finish:
        ex.finish[idx] = choice.get("finish_reason")


async def _read_stream(client: httpx.AsyncClient, path: str, body: dict, ex: Exchange,
                       stop_after: int | None) -> None:
    async with client.stream("POST", path, json=body) as resp:
        ex.status, ex.retry_after = resp.status_code, resp.headers.get("retry-after")
        if resp.status_code != 200:
            ex.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
            return
        if stop_after == 0:  # hang up once the server has accepted the request, before any chunk
            ex.closed_early = True
            return
        async for obj in sse_events(resp):
            if obj is None:
                ex.done = True
                return
            if "error" in obj:
                ex.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                return
            if obj.get("usage"):
                ex.usage = obj["usage"]
            if obj.get("choices"):
                ex.chunk_s.append(time.perf_counter() - ex.sent)
                for choice in obj["choices"]:
                    _add_choice(ex, choice)
                if stop_after is not None and len(ex.chunk_s) >= stop_after:
                    ex.closed_early = True  # leaving the block unread closes the connection mid-stream
                    return
        ex.error = "the stream ended without [DONE]"


async def _read_json(client: httpx.AsyncClient, path: str, body: dict, ex: Exchange) -> None:
    resp = await client.post(path, json=body)
    ex.status, ex.retry_after = resp.status_code, resp.headers.get("retry-after")
    if resp.status_code != 200:
        ex.error = f"HTTP {resp.status_code}: {resp.text[:300]}"
        return
    obj = resp.json()
    for choice in obj.get("choices") or []:
        _add_choice(ex, choice)
    ex.usage = obj.get("usage")
    ex.done = True


async def send(client: httpx.AsyncClient, path: str, body: dict, stop_after: int | None = None,
               ex: Exchange | None = None) -> Exchange:
    """POST body to path (streaming if body["stream"]); hang up after stop_after chunks if given (0: as soon
    as the response headers arrive).

    Errors and transport failures are recorded in the Exchange; cancellation propagates (the caller's abort),
    and the Exchange passed in keeps what had arrived by then.
    """
    ex = ex if ex is not None else Exchange()
    ex.sent = time.perf_counter()
    try:
        if body.get("stream"):
            await _read_stream(client, path, body, ex, stop_after)
        else:
            await _read_json(client, path, body, ex)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:  # transport errors, malformed answers
        ex.error = f"{type(e).__name__}: {e}"
    finally:
        ex.ended = time.perf_counter()
    return ex
