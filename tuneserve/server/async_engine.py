"""AsyncEngine: the engine loop in a background thread, streaming outputs to asyncio consumers.

Only the loop thread touches the LLMEngine's mutable state. Handlers validate requests in their own
thread (`prepare_request` is pure) and hand them over through a queue; aborts go the same way, so a
client that disconnects frees its KV blocks at the start of the next step.

Admission is counted in sequences (n samples x prompts): a handler reserves its sequences before it
prepares, atomically against the waiting-queue limit, and the loop releases the reservation once the
sequences sit in the scheduler's queue, so the count never misses a request in transit.

The loop never dies of one request: the engine isolates failures (engine/isolation.py). Only EngineFatalError
(a failed reset) ends it; then every waiting client gets an error and `on_fatal` runs (the server exits
the process, so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from tuneserve.engine.llm_engine import LLMEngine
from tuneserve.engine.prepared import PreparedRequest
from tuneserve.errors import RequestError
from tuneserve.outputs import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop stopped with an exception; the server reports unhealthy."""


class EngineBusyError(RuntimeError):
    """The engine cannot take the request now (resetting after a failed step); retry shortly."""


class RequestFailedError(RuntimeError):
    """The engine ended this request in error (RequestError: status and message for the client)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    q: asyncio.Queue


class AsyncEngine:
    """Thread-hosted engine loop with per-request asyncio queues."""

    def __init__(self, engine: LLMEngine, on_finished: Callable | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_finished = on_finished  # called from the loop thread with each finished RequestOutput
        self.on_fatal = on_fatal  # called from the loop thread when the loop dies
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", (prepared, reserved), stream) | ("abort", id)
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.dead: BaseException | None = None
        self._lock = threading.Lock()
        self._reserved = 0  # sequences admitted by handlers, not yet in the scheduler's queue
        self.in_flight = 0  # generate() calls not yet returned (drain waits for 0)
        self._thread = threading.Thread(target=self._run, name="tuneserve-engine", daemon=True)
        self._thread.start()

    # ----- admission (any thread) ------------------------------------------------------------
    def reserve(self, num_seqs: int, limit: int) -> bool:
        """Admit num_seqs sequences if the waiting queue stays within `limit`; False: the queue is full."""
        with self._lock:
            if self.engine.scheduler.num_waiting + self._reserved + num_seqs > limit:
                return False
            self._reserved += num_seqs
            return True

    def release(self, num_seqs: int) -> None:
        with self._lock:
            self._reserved -= num_seqs

    @property
    def num_waiting(self) -> int:
        """Sequences waiting: in the scheduler's queue or admitted on their way to it."""
        return self.engine.scheduler.num_waiting + self._reserved

    def check_available(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop has died: {self.dead!r}")
        if self.engine.resetting:
            raise EngineBusyError("the engine is resetting after a failed step; retry shortly")

    # ----- called from the event loop ------------------------------------------------------
    async def generate(self, prepared: PreparedRequest, reserved: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit a prepared request and yield its outputs until it finishes (aborting it if the
        consumer stops early, e.g. because the client went away). `reserved`: sequences this request
        holds in the admission count, released once it is queued. Raises RequestFailedError when the
        engine ends the request in error."""
        self.in_flight += 1
        rid = prepared.parent.request_id
        finished = False
        try:
            self.check_available()
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
            self._inbox.put(("add", (prepared, reserved), stream))
            reserved = 0  # the loop releases it now
            self._wake.set()
            if self.dead is not None:  # died between the check and the put: the loop may never see it
                self._fail_inbox()
            while True:
                item = await stream.q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
                if finished:
                    return
        finally:
            self.in_flight -= 1
            if reserved:
                self.release(reserved)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def has_work(self) -> bool:
        return self.in_flight > 0

    async def drain(self, timeout: float) -> None:
        """Wait up to timeout seconds for in-flight requests, then abort what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.has_work() and loop.time() < deadline and self.dead is None:
            await asyncio.sleep(0.05)
        for rid in list(self._streams):
            self.abort(rid)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.engine.shutdown()

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
            self._die(e)

    def _die(self, e: BaseException) -> None:
        self.dead = e
        err = EngineDeadError(f"the engine loop has died: {e!r}")
        for s in self._streams.values():
            s.loop.call_soon_threadsafe(s.q.put_nowait, err)
        self._streams.clear()
        self._fail_inbox()
        if self.on_fatal is not None:
            self.on_fatal(e)

    def _inbox_items(self) -> Iterator[tuple]:
        """What handlers have put in the inbox so far, oldest first."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _fail_inbox(self) -> None:
        """Answer every request still in the inbox with the loop's death (nothing waits forever)."""
        err = EngineDeadError(f"the engine loop has died: {self.dead!r}")
        for kind, payload, stream in self._inbox_items():
            if kind == "add":
                self.release(payload[1])
                stream.loop.call_soon_threadsafe(stream.q.put_nowait, err)

    def _drain_inbox(self) -> None:
        for kind, payload, stream in self._inbox_items():
            if kind == "add":
                self._submit(*payload, stream)
            elif payload in self._streams or payload in self.engine.output.parents:
                self.engine.abort_request(payload)

    def _submit(self, prepared: PreparedRequest, reserved: int, stream: _Stream) -> None:
        rid = prepared.parent.request_id
        try:
            self.engine.submit(prepared)
            self._streams[rid] = stream
        except ValueError as e:
            stream.loop.call_soon_threadsafe(stream.q.put_nowait, RequestFailedError(RequestError(str(e), 400)))
        finally:
            self.release(reserved)  # after the submit: the queue now counts these sequences

    def _deliver(self, out: RequestOutput) -> None:
        s = self._streams.get(out.request_id)
        if out.finished:
            self._streams.pop(out.request_id, None)
            if self.on_finished is not None:
                self.on_finished(out)
        if s is not None:
            s.loop.call_soon_threadsafe(s.q.put_nowait, out)
