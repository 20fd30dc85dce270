"""EngineReplica: one tuneserve engine and its server app inside a Ray Serve replica.

The replica does not reimplement the API: it runs the server's own FastAPI app in-process, driving its
ASGI interface with the request the ingress forwards, and streams the response back as a generator
(first the status and headers, then body chunks as the app writes them). So validation, errors,
backpressure of the engine's queue and SSE streaming are the single server's, and the engine knows
nothing of Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from tuneserve.deploy.config import DeployConfig

logger = logging.getLogger("tuneserve.deploy")


async def call_asgi(app, method: str, path: str, headers: list[tuple[str, str]], body: bytes,  # noqa: ANN001
                    query: str = "") -> AsyncIterator[dict | bytes]:
    """Run one HTTP request through an ASGI app: yields {"status", "headers"}, then body chunks."""
    out: asyncio.Queue = asyncio.Queue()
    sent = False
    gone = asyncio.Event()

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # the app polls for a disconnect: there is one only when the caller leaves
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await out.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.create_task(app(scope, receive, send))
    done = False
    try:
        while not done:
            getter = asyncio.create_task(out.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                if task.exception() is not None:
                    raise task.exception()
                raise RuntimeError("the app returned without a complete response")
            msg = getter.result()
            if msg["type"] == "http.response.start":
                yield {"status": msg["status"],
                       "headers": [(k.decode(), v.decode()) for k, v in msg.get("headers", [])]}
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                done = not msg.get("more_body", False)
    finally:
        gone.set()  # a caller that stops early is a client that left: the app aborts the request
        if not task.done():
            try:
                await asyncio.wait_for(task, 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - cleanup only
                task.cancel()


class EngineReplica:
    """A Ray Serve deployment class (decorated in app.py): one engine per replica."""

    def __init__(self, config: dict) -> None:
        import torch

        from tuneserve.engine.llm_engine import LLMEngine
        from tuneserve.server.app import build_app

        cfg = DeployConfig.from_dict(config)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        args = cfg.engine()
        self.app = build_app(args, cfg.settings(), engine=LLMEngine.from_engine_args(args))
        self.state = self.app.state.tuneserve
        try:
            from ray import serve

            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Ray Serve (tests of the class itself)
            self.replica_id = "local"

    async def handle(self, request: dict) -> AsyncIterator[dict | bytes]:
        """Serve one forwarded request: {"method", "path", "query", "headers", "body"} (see ingress.py), or
        {"metrics": true}: this replica's Prometheus page, {"replica", "metrics"}."""
        if request.get("metrics"):
            yield {"replica": self.replica_id, "metrics": self.state.metrics.render().decode()}
            return
        first = True
        async for item in call_asgi(self.app, request["method"], request["path"], request.get("headers", []),
                                    request.get("body") or b"", request.get("query", "")):
            if first:
                item["replica"] = self.replica_id
                first = False
            yield item

    def check_health(self) -> None:
        """Ray calls this every health_check_period_s; raising makes it replace the replica."""
        eng = self.state.engine
        if eng is None:
            raise RuntimeError("the engine is not loaded")
        if eng.dead is not None:
            raise RuntimeError(f"the engine loop has died: {eng.dead!r}")
        if not eng._thread.is_alive():
            raise RuntimeError("the engine loop thread has stopped")

    def __del__(self) -> None:
        eng = getattr(getattr(self, "state", None), "engine", None)
        if eng is not None:
            eng.shutdown()
