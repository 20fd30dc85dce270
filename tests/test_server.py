"""The OpenAI-compatible server, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer

from tuneserve import LLM, SamplingParams
from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings

MODEL = "tiny"
PROMPTS = [f"Request number {i}: tell me about item {i * 7}." for i in range(32)]


@pytest.fixture(scope="module")
def server(tiny_dirs):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, max_waiting_requests=1000))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def engine_of(server):
    return server.state.engine.engine


def wait_idle(server, timeout=10.0):
    eng = engine_of(server)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not eng.has_unfinished_requests() and eng.kv.usage == 0:
            return True
        time.sleep(0.02)
    return False


def test_completions(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len("Hello there")


def test_completions_stream_equals_non_stream(client):
    kw = dict(model=MODEL, prompt="Streaming test", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_and_stream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_usage_reports_cached_tokens(client):
    """The second request with the same 100-token prompt hits the prefix cache for its 6 whole blocks of 16
    (96 tokens); the first hits nothing. The openai client parses the field, streamed usage included."""
    prompt = "".join(chr(ord("a") + (i * 7) % 26) for i in range(100))  # byte tokenizer: 100 tokens
    kw = dict(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    first = client.completions.create(**kw)
    assert first.usage.prompt_tokens == 100 and first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(**kw)
    assert second.usage.prompt_tokens_details.cached_tokens == 96
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 96
    msgs = [{"role": "user", "content": prompt[::-1]}]
    chat = [client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2) for _ in range(2)]
    n = chat[0].usage.prompt_tokens
    assert chat[0].usage.prompt_tokens_details.cached_tokens == 0
    assert chat[1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True})
    assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16


def test_n_logprobs_stop_seed(client):
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=1.0, n=2, seed=11,
                                  logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.top_logprobs[0]) <= 3 and all(v <= 0 for v in lp.token_logprobs)
    again = client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=1.0, n=2, seed=11,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    ref = client.completions.create(model=MODEL, prompt="stop test", max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    stop = ref[4:6]
    cut = client.completions.create(model=MODEL, prompt="stop test", max_tokens=16, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == ref[:ref.index(stop)] and cut.finish_reason == "stop"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=0)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 2


def test_32_concurrent_streams_equal_offline_generate(server, tiny_dirs):
    async def one(c, prompt):
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def all_of():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        return await asyncio.gather(*(one(c, p) for p in PROMPTS))

    texts = asyncio.run(all_of())
    llm = LLM(str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert texts == [o.outputs[0].text for o in offline]
    assert wait_idle(server)


@pytest.fixture
def slow_steps(server, monkeypatch):
    """Make each engine step take >= 10 ms so a request is surely in flight when the client leaves."""
    runner = engine_of(server).runner
    real = runner.execute
    monkeypatch.setattr(runner, "execute", lambda sched: (time.sleep(0.01), real(sched))[1])


def test_disconnect_mid_stream_frees_blocks(server, client, slow_steps):
    eng = engine_of(server)
    aborted = eng.get_stats().finished.get("abort", 0)
    body = {"model": MODEL, "prompt": "a long story " * 5, "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as h, h.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                got += 1
            if got >= 3:
                break
        assert eng.kv.usage > 0
    assert wait_idle(server), "blocks of a disconnected client were not freed"
    assert client.completions.create(model=MODEL, prompt="still alive?", max_tokens=2).choices
    assert eng.get_stats().finished.get("abort", 0) == aborted + 1


def test_disconnect_non_streaming_aborts(server, slow_steps):
    eng = engine_of(server)
    aborted = eng.get_stats().finished.get("abort", 0)
    body = {"model": MODEL, "prompt": "wait for me", "max_tokens": 240, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    assert wait_idle(server)
    assert eng.get_stats().finished.get("abort", 0) == aborted + 1


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def error_of(r):
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    return e


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 2), ("n", 0), ("max_tokens", 0),
                                         ("presence_penalty", 5), ("logprobs", 50), ("top_k", -5)])
def test_invalid_values_are_400_naming_the_parameter(server, field, value):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", field: value})
    assert r.status_code == 400
    e = error_of(r)
    assert e["param"] == field and field in e["message"] and "must be" in e["message"]


def test_wrong_type_is_400(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"


def test_context_overflow_states_the_three_numbers(server):
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "y" * 250, "max_tokens": 10})
    assert r.status_code == 400
    msg = error_of(r)["message"]
    assert "256" in msg and "250" in msg and "10" in msg
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "y" * 250})  # max_tokens omitted: the rest
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 6


def test_unknown_model_is_404(server):
    r = post(server, "/v1/completions", {"model": "gpt-17", "prompt": "x"})
    assert r.status_code == 404 and error_of(r)["param"] == "model"


def test_chat_without_template_is_400(server, monkeypatch):
    monkeypatch.setattr(server.state.serving.tokenizer, "chat_template", None)
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in error_of(r)["message"]


def test_tokenize_detokenize_models_version_docs(server):
    t = post(server, "/tokenize", {"prompt": "hey"}).json()
    assert t["count"] == 3 and t["max_model_len"] == 256
    assert post(server, "/detokenize", {"tokens": t["tokens"]}).json()["prompt"] == "hey"
    assert post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400
    models = httpx.get(server.url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert httpx.get(server.url + "/version").json()["version"]
    assert httpx.get(server.url + "/openapi.json").status_code == 200
    assert httpx.get(server.url + "/docs").status_code == 200


def test_metrics_after_traffic(server, client):
    client.completions.create(model=MODEL, prompt="metrics " * 20, max_tokens=4)
    client.completions.create(model=MODEL, prompt="metrics " * 20, max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_count", "request_queue_time_seconds_count", "num_requests_running",
                 "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "prompt_tokens_total", "generation_tokens_total",
                 "num_preemptions_total", 'request_success_total{finished_reason="length"'):
        assert "tuneserve:" + name in text, name
    hits = [line for line in text.splitlines() if line.startswith("tuneserve:prefix_cache_hits_total")]
    assert float(hits[0].split()[-1]) > 0


@pytest.fixture(scope="module")
def strict_server(tiny_dirs):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256,
                      max_num_seqs=1)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, api_key="sekret", max_waiting_requests=1,
                                        max_request_bytes=2000))
    yield s
    s.stop()


def test_api_key_required_on_every_v1_route(strict_server):
    for method, path in [("get", "/v1/models"), ("post", "/v1/completions"), ("post", "/v1/chat/completions")]:
        r = httpx.request(method, strict_server.url + path, json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
        r = httpx.request(method, strict_server.url + path, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    c = openai.OpenAI(base_url=strict_server.url + "/v1", api_key="sekret")
    assert c.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def test_body_limit_is_413(strict_server):
    r = httpx.post(strict_server.url + "/v1/completions", json={"model": MODEL, "prompt": "x" * 5000},
                   headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 413 and "limit" in error_of(r)["message"]


def test_queue_limit_is_503_with_retry_after(strict_server, monkeypatch):
    runner = engine_of(strict_server).runner
    real = runner.execute
    monkeypatch.setattr(runner, "execute", lambda sched: (time.sleep(0.01), real(sched))[1])

    async def fire():
        async with httpx.AsyncClient(timeout=60) as h:
            body = {"model": MODEL, "prompt": "busy", "max_tokens": 60, "ignore_eos": True}
            hdr = {"Authorization": "Bearer sekret"}
            return await asyncio.gather(*(h.post(strict_server.url + "/v1/completions", json=body, headers=hdr)
                                          for _ in range(6)))

    responses = asyncio.run(fire())  # one burst: a second one raced the queue draining and flaked
    codes = [r.status_code for r in responses]
    assert 503 in codes and 200 in codes
    r503 = next(r for r in responses if r.status_code == 503)
    assert r503.headers["retry-after"] == "1" and error_of(r503)["code"] == "overloaded"


def test_health_is_503_while_loading(tiny_dirs, monkeypatch):
    import threading

    from tuneserve.engine.llm_engine import LLMEngine

    gate = threading.Event()
    real = LLMEngine.from_engine_args
    monkeypatch.setattr(LLMEngine, "from_engine_args", classmethod(lambda cls, a: gate.wait() and real(a)))
    s = LiveServer(EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES), wait=False)
    try:
        deadline = time.time() + 10
        while True:
            try:
                r = httpx.get(s.url + "/health")
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.05)
        assert r.status_code == 503 and error_of(r)["code"] == "loading"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "2"
        gate.set()
        s.wait_healthy()
    finally:
        gate.set()
        s.stop()
