"""`tuneserve serve` as a process: SIGTERM drains in-flight requests, then exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from server_utils import free_port, wait_until_healthy


@pytest.mark.model
def test_sigterm_drains_in_flight_requests_then_exits():
    port = free_port()
    env = {**os.environ, "TUNESERVE_QUIET": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tuneserve.cli.main", "serve", "smollm2-135m", "--port", str(port),
                             "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20),
                             "--drain-timeout", "60", "--log-level", "warning"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        chunks: list[dict] = []
        first = threading.Event()

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 60, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first.set()

        t = threading.Thread(target=stream)
        t.start()
        assert first.wait(60)
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the in-flight request completed
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_stopped_in_process_server_lets_go_of_its_engine(tiny_dirs):
    """FastAPI caches route functions process-wide, and ours close over the server's state: every stopped
    server's engine, KV cache included, stayed alive (an in-process tune grew to 13 GiB over six
    configurations). Stopped, a server holds no engine; a later request is told it has shut down."""
    import gc
    import weakref

    from conftest import TINY_KV_BYTES

    from tuneserve.bench.sweep_serve import ServeSession

    args = {"model": str(tiny_dirs["llama"]), "kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024}
    engines = []
    for _ in range(2):
        with ServeSession(str(tiny_dirs["llama"]), args, threads=1) as s:
            s.run("random", 3, 4, None, seed=1)
            engines.append(weakref.ref(s.engine))
            state = s.srv.state
    gc.collect()
    assert [e() for e in engines] == [None, None]
    assert state.engine is None and state.metrics is None and state.closed
    with pytest.raises(Exception, match="the server has shut down"):
        state.ready()
