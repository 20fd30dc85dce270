"""EngineReplica without Ray: it serves forwarded requests through the server's own app (whole and
streamed responses, errors), gives its metrics, and fails its health check once its engine loop is dead."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from conftest import TINY_KV_BYTES

from tuneserve.deploy.config import DeployConfig
from tuneserve.deploy.replica import EngineReplica


@pytest.fixture(scope="module")
def replica(tiny_dirs):
    cfg = DeployConfig(model=str(tiny_dirs["llama"]), served_model_name="tiny", torch_threads=None,
                       engine_args={"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 256})
    r = EngineReplica(dataclasses.asdict(cfg))
    yield r
    r.state.engine.shutdown()


def call(replica: EngineReplica, path: str, body: dict | None = None, method: str = "POST") -> list:
    async def run() -> list:
        req = {"method": method, "path": path, "headers": [("content-type", "application/json")],
               "body": json.dumps(body).encode() if body is not None else b""}
        return [item async for item in replica.handle(req)]

    return asyncio.run(run())


def test_whole_response_through_the_app(replica):
    head, *chunks = call(replica, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4,
                                                       "ignore_eos": True})
    assert head["status"] == 200 and head["replica"] == "local"
    body = json.loads(b"".join(chunks))
    assert body["usage"]["completion_tokens"] == 4 and body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    head, *chunks = call(replica, "/v1/completions", {"model": "tiny", "prompt": "Hello", "temperature": -1})
    assert head["status"] == 400 and json.loads(b"".join(chunks))["error"]["param"] == "temperature"
    head, *_ = call(replica, "/health", method="GET")
    assert head["status"] == 200


def test_stream_arrives_event_by_event(replica):
    head, *chunks = call(replica, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 5,
                                                       "ignore_eos": True, "stream": True})
    assert head["status"] == 200 and dict(head["headers"])["content-type"].startswith("text/event-stream")
    events = [c.decode() for c in chunks]
    assert len(events) == 6 and events[-1] == "data: [DONE]\n\n"  # one chunk per token, then [DONE]


def test_metrics_and_health(replica):
    async def metrics() -> list:
        return [item async for item in replica.handle({"metrics": True})]

    (page,) = asyncio.run(metrics())
    assert page["replica"] == "local" and "tuneserve:prompt_tokens_total" in page["metrics"]
    replica.check_health()
    replica.state.engine.dead = RuntimeError("boom")
    try:
        with pytest.raises(RuntimeError, match="engine loop has died"):
            replica.check_health()
    finally:
        replica.state.engine.dead = None
