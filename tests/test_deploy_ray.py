"""Replicas on a local Ray Serve cluster: 2 replicas of a tiny model behind the ingress. Prefix affinity,
streaming with the openai client, per-replica metrics, 503 under backpressure, a killed replica retried
around and replaced, a started stream ended by an error event.

The cluster takes ~45 s to start on 2 cores, so `make test` runs only the affinity and streaming checks on it;
backpressure and faults (~30 s more) run in `make test-all`."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest
from conftest import TINY_KV_BYTES
from server_utils import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tuneserve.deploy.application import build_app  # noqa: E402
from tuneserve.deploy.config import DeployConfig  # noqa: E402
from tuneserve.deploy.ingress import REPLICA_HEADER  # noqa: E402

APP = "tuneserve"
PREFIX = "".join(chr(97 + (j * 7) % 26) for j in range(160))  # 160 tokens (byte tokenizer), 10 blocks


@pytest.fixture(scope="module")
def cluster(tiny_dirs):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = DeployConfig(model=str(tiny_dirs["llama"]), served_model_name="tiny",
                           engine_args={"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024},
                           num_replicas=2, max_ongoing_requests=2, max_queued_requests=2,
                           health_check_period_s=1, torch_threads=1, graceful_shutdown_timeout_s=1)
        serve.run(build_app(cfg), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def complete(url: str, prompt: str, max_tokens: int = 2, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})


def kill(replica: str) -> None:
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#EngineReplica#{replica}", namespace="serve"), no_restart=True)


def wait_two_running(timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        d = serve.status().applications[APP].deployments["EngineReplica"]
        if d.replica_states.get("RUNNING", 0) == 2 and d.status == "HEALTHY":
            return
        time.sleep(0.2)
    raise AssertionError(f"the killed replica was not replaced: {d}")


def test_shared_prefixes_stay_on_their_replica(cluster):
    """Requests sharing a prefix land where it is cached (cached_tokens says so); a new prefix goes to the
    other replica; /metrics shows both replicas."""
    first = complete(cluster, PREFIX + " q0")
    home = first.headers[REPLICA_HEADER]
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    for q in range(1, 5):
        r = complete(cluster, PREFIX + f" q{q}")
        assert r.headers[REPLICA_HEADER] == home
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 160
    other = complete(cluster, PREFIX[::-1] + " q0")
    assert other.headers[REPLICA_HEADER] != home
    page = httpx.get(cluster + "/metrics", timeout=30).text
    assert {home, other.headers[REPLICA_HEADER]} <= {line.split('replica="')[1].split('"')[0]
                                                    for line in page.splitlines() if 'replica="' in line}
    assert f'tuneserve:prefix_cache_hits_total{{model_name="tiny",replica="{home}"}} 640.0' in page


def test_streaming_through_the_ingress(cluster):
    client = openai.OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": PREFIX[:80]}]
    kw = dict(model="tiny", messages=msgs, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == full.usage.prompt_tokens // 16 * 16 - \
        (16 if full.usage.prompt_tokens % 16 == 0 else 0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(cluster + "/health").status_code == 200
    assert "/v1/completions" in httpx.get(cluster + "/openapi.json").json()["paths"]  # the replica's document


@pytest.mark.slow
def test_backpressure_is_503_with_retry_after(cluster):
    """2 replicas x 2 ongoing + 2 queued: of 12 long requests at once, some are refused at once."""
    with cf.ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(lambda i: complete(cluster, f"{i} busy", 150, ignore_eos=True), range(12)))
    codes = [r.status_code for r in rs]
    assert codes.count(200) >= 4 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
    refused = next(r for r in rs if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "overloaded"


@pytest.mark.slow
def test_killed_replica_is_retried_around_and_replaced(cluster):
    """A request that had not started when its replica died is answered by the other; a started stream
    ends with an error event and [DONE]; Ray replaces the dead replica."""
    home = complete(cluster, PREFIX + " kill").headers[REPLICA_HEADER]
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(complete, cluster, PREFIX + " kill me", 600, ignore_eos=True)  # affinity: on `home`
        time.sleep(0.5)
        kill(home)
        r = fut.result()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 600
    assert r.headers[REPLICA_HEADER] != home
    wait_two_running()

    home = complete(cluster, PREFIX + " stream").headers[REPLICA_HEADER]
    events = []
    with httpx.stream("POST", cluster + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": PREFIX + " stream on", "max_tokens": 600, "stream": True,
                            "ignore_eos": True}) as resp:
        assert resp.headers[REPLICA_HEADER] == home
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    kill(home)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "replica_failed"
    assert len(events) < 602  # it did not run to the end
    wait_two_running()
    assert complete(cluster, PREFIX + " after").status_code == 200
