"""AsyncEngine: the engine loop in a background thread, streaming outputs to asyncio consumers.

Only the loop thread touches the LLMEngine's mutable state. Handlers validate requests in their own
thread (`prepare_request` is pure) and hand them over through a queue; aborts go the same way, so a
client that disconnects frees its KV blocks at the start of the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tuneserve.engine import LLMEngine, PreparedRequest
from tuneserve.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop stopped with an exception; the server reports unhealthy."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue


class AsyncEngine:
    """Thread-hosted engine loop with per-request asyncio queues."""

    def __init__(self, engine: LLMEngine, on_finished=None) -> None:  # noqa: ANN001 - metrics callback
        self.engine = engine
        self.on_finished = on_finished  # called from the loop thread with each finished RequestOutput
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", prepared, stream) | ("abort", id)
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dead: BaseException | None = None
        self.num_pending = 0  # submitted by handlers, not yet seen by the loop
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tuneserve-engine", daemon=True)
        self._thread.start()

    # ----- called from the event loop ------------------------------------------------------
    async def generate(self, prepared: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Submit a prepared request and yield its outputs until it finishes (aborting it if the
        consumer stops early, e.g. because the client went away)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead!r}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        rid = prepared.parent.request_id
        with self._pending_lock:
            self.num_pending += 1
        self._inbox.put(("add", prepared, stream))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self.num_pending

    def has_work(self) -> bool:
        return bool(self._streams) or self.num_pending > 0

    async def drain(self, timeout: float) -> None:
        """Wait up to timeout seconds for in-flight requests, then abort what is left."""
        deadline = time.monotonic() + timeout
        while self.has_work() and time.monotonic() < deadline and self.dead is None:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # ----- the loop thread ------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
        except BaseException as e:  # noqa: BLE001 - every failure must reach the waiting clients
            self.dead = e
            err = EngineDeadError(f"the engine loop has died: {e!r}")
            for s in self._streams.values():
                s.loop.call_soon_threadsafe(s.q.put_nowait, err)
            self._streams.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload, stream = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._pending_lock:
                    self.num_pending -= 1
                rid = payload.parent.request_id
                try:
                    self.engine.submit(payload)
                    self._streams[rid] = stream
                except ValueError as e:
                    stream.loop.call_soon_threadsafe(stream.q.put_nowait, e)
            elif payload in self._streams or payload in self.engine.output.parents:
                self.engine.abort_request(payload)

    def _deliver(self, out: RequestOutput) -> None:
        s = self._streams.get(out.request_id)
        if out.finished:
            self._streams.pop(out.request_id, None)
            if self.on_finished is not None:
                self.on_finished(out)
        if s is not None:
            s.loop.call_soon_threadsafe(s.q.put_nowait, out)
