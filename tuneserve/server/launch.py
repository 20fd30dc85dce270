"""Run the tuneserve app in a background thread on a free local port (benchmarks, sweeps, tests)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings, build_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundServer:
    """An in-process server: `with BackgroundServer(args) as s: ... s.url ...`."""

    def __init__(self, args: EngineArgs, settings: ServerSettings | None = None, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = settings or ServerSettings()
        self.app = build_app(args, settings)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                             timeout_graceful_shutdown=5, h11_max_incomplete_event_size=settings.max_header_bytes)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        if wait:
            self.wait_healthy()

    @property
    def state(self):  # noqa: ANN201 - the app's ServerState
        return self.app.state.tuneserve

    def wait_healthy(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.state.load_error is not None:
                raise RuntimeError(f"the model failed to load: {self.state.load_error}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
