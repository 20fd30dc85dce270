"""The server under faults, overload, slow or vanished clients and hostile templates: every failure is
answered, nothing waits forever, nothing leaks, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer, free_port, wait_until_healthy

from tuneserve import faults
from tuneserve.engine_args import EngineArgs
from tuneserve.faults import Fault
from tuneserve.server.app import ServerSettings

MODEL = "tiny"
KEY = {"Authorization": "Bearer k"}


class Gate:
    """Holds the engine loop inside its next forward until opened (the step is then 'in flight')."""

    def __init__(self, runner) -> None:  # noqa: ANN001
        self.open_ = threading.Event()
        self.open_.set()
        real = runner.execute
        runner.execute = lambda sched: (self.open_.wait(30), real(sched))[1]

    def close(self) -> None:
        self.open_.clear()

    def open(self) -> None:
        self.open_.set()


@pytest.fixture(scope="module")
def hard(tiny_dirs):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    s = LiveServer(args, ServerSettings(served_model_name=MODEL, api_key="k", max_waiting_requests=4,
                                        trust_request_chat_template=True, metrics_require_api_key=True,
                                        max_request_seconds=3.0))
    s.gate = Gate(s.state.engine.engine.runner)
    yield s
    s.gate.open()
    s.stop()


def post(server, body, path="/v1/completions", timeout=30.0):
    return httpx.post(server.url + path, json={"model": MODEL, **body}, headers=KEY, timeout=timeout)


def events(server, body, path="/v1/completions"):
    """The data payloads of an SSE response."""
    with httpx.stream("POST", server.url + path, json={"model": MODEL, "stream": True, **body}, headers=KEY,
                      timeout=30) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def wait_idle(server, timeout=10.0):
    eng = server.state.engine.engine
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = eng.get_stats()
        if not eng.has_unfinished_requests() and s.num_blocks_in_use == 0 and server.state.engine.in_flight == 0:
            return True
        time.sleep(0.02)
    return False


def metric(server, name):
    text = httpx.get(server.url + "/metrics", headers=KEY).text
    lines = [ln for ln in text.splitlines() if ln.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


GREEDY = {"max_tokens": 12, "temperature": 0, "ignore_eos": True}


def test_a_request_failed_by_the_engine_gets_a_500_and_the_others_go_on(hard):
    clean = [post(hard, {"prompt": f"request {i}", **GREEDY}).json()["choices"][0]["text"] for i in range(3)]
    with faults.inject(Fault("sample", at=4)) as inj:

        async def burst():
            async with httpx.AsyncClient(timeout=30, headers=KEY) as h:
                return await asyncio.gather(*(h.post(hard.url + "/v1/completions",
                                                     json={"model": MODEL, "prompt": f"request {i}", **GREEDY})
                                              for i in range(3)))

        rs = asyncio.run(burst())
    assert sorted(r.status_code for r in rs) == [200, 200, 500]
    bad = next(r for r in rs if r.status_code == 500).json()["error"]
    assert bad["code"] == "engine_error" and "sample" in bad["message"] and inj.victims
    assert [r.json()["choices"][0]["text"] for r in rs if r.status_code == 200] == \
        [t for r, t in zip(rs, clean) if r.status_code == 200]
    assert wait_idle(hard)
    assert metric(hard, 'tuneserve:engine_errors_total{kind="sample"') == 1


def test_a_stream_failed_by_the_engine_gets_an_error_event_before_done(hard):
    with faults.inject(Fault("detokenize", at=3)):
        data = events(hard, {"prompt": "stream me", **GREEDY})
    assert data[-1] == "[DONE]"
    err = json.loads(data[-2])["error"]
    assert err["code"] == "engine_error" and "detokenize" in err["message"]
    assert sum(1 for d in data if '"text"' in d) >= 2  # tokens came before the failure
    assert wait_idle(hard)


def test_a_failed_forward_resets_and_the_server_serves_on(hard):
    with faults.inject(Fault("forward")):
        r = post(hard, {"prompt": "boom", **GREEDY})
    assert r.status_code == 500 and "reset" in r.json()["error"]["message"]
    assert httpx.get(hard.url + "/health").status_code == 200
    assert post(hard, {"prompt": "after", **GREEDY}).status_code == 200
    assert metric(hard, 'tuneserve:engine_errors_total{kind="step"') == 1
    assert wait_idle(hard)


def test_admission_counts_sequences_atomically(hard, monkeypatch):
    """Limit 4 sequences: of ten concurrent n=2 requests, exactly two get in; the rest are 503 at once.

    The engine is held before it schedules (not inside a forward): once admitted requests run, they no
    longer wait, and the queue rightly admits more."""
    engine = hard.state.engine.engine
    real_step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (hard.gate.open_.wait(30), real_step())[1])
    hard.gate.close()
    try:
        async def burst():
            async with httpx.AsyncClient(timeout=30, headers=KEY) as h:
                body = {"model": MODEL, "prompt": "queue", "n": 2, **GREEDY}
                tasks = [asyncio.create_task(h.post(hard.url + "/v1/completions", json=body)) for _ in range(10)]
                rejected = []
                deadline = time.monotonic() + 20
                while len(rejected) < 8 and time.monotonic() < deadline:
                    rejected = [t for t in tasks if t.done() and t.result().status_code == 503]
                    await asyncio.sleep(0.02)
                hard.gate.open()
                return len(rejected), await asyncio.gather(*tasks)

        rejected_while_held, rs = asyncio.run(burst())
    finally:
        hard.gate.open()
    assert rejected_while_held == 8  # the rejections did not wait for the engine
    # the two admitted ones finish once the step goes on, or hit the 3 s request limit on a slow machine
    codes = [r.status_code for r in rs]
    assert codes.count(503) == 8 and {c for c in codes if c != 503} <= {200, 504}
    monkeypatch.undo()
    r503 = next(r for r in rs if r.status_code == 503)
    assert r503.headers["retry-after"] == "1" and r503.json()["error"]["code"] == "overloaded"
    r = post(hard, {"prompt": "x", "n": 5, **GREEDY})  # 5 sequences never fit a queue of 4: no retry helps
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert wait_idle(hard)
    assert hard.state.engine.num_waiting == 0


def test_the_request_time_limit_ends_hung_requests(hard):
    hard.gate.close()
    try:
        r = post(hard, {"prompt": "slow", **GREEDY})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        data = events(hard, {"prompt": "slow stream", **GREEDY})
        assert json.loads(data[-2])["error"]["code"] == "timeout" and data[-1] == "[DONE]"
    finally:
        hard.gate.open()
    assert wait_idle(hard)


def test_a_non_streaming_client_that_leaves_logs_no_asgi_exception(hard, caplog):
    uvicorn_log = logging.getLogger("uvicorn.error")  # it does not propagate to the root logger
    uvicorn_log.addHandler(caplog.handler)
    hard.gate.close()
    try:
        with pytest.raises(httpx.ReadTimeout):
            post(hard, {"prompt": "bye", **GREEDY}, timeout=0.5)
        time.sleep(0.5)  # the server notices the disconnect (it polls every 0.2 s)
        hard.gate.open()
        assert wait_idle(hard)
    finally:
        hard.gate.open()
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_request_chat_templates_are_sandboxed_and_bounded(hard, tiny_dirs):
    tpl = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": tpl, **GREEDY}
    assert post(hard, body, "/v1/chat/completions").status_code == 200
    for bad, why in [("{{ ''.__class__.__mro__ }}", "unsafe"), ("{% for i in range(99999) %}x{% endfor %}", "range"),
                     ("{{ 'x' * 100000000 }}", "size"), ("{% for m in messages %}", "")]:
        r = post(hard, {**body, "chat_template": bad}, "/v1/chat/completions")
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template", bad
        assert why in r.json()["error"]["message"]


def test_request_chat_templates_are_refused_unless_the_operator_allows_them(tiny_dirs):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    with LiveServer(args, ServerSettings(served_model_name=MODEL)) as s:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ 1 }}"}
        r = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"
        assert "--trust-request-chat-template" in r.json()["error"]["message"]
        assert httpx.get(s.url + "/metrics").status_code == 200  # open unless the operator guards it


def test_the_api_key_guards_metrics_when_asked_and_failures_are_counted(hard):
    before = metric(hard, "tuneserve:api_key_failures_total")
    assert httpx.get(hard.url + "/metrics").status_code == 401
    for path in ("/v1/models", "/tokenize", "/detokenize"):
        r = httpx.request("GET" if path == "/v1/models" else "POST", hard.url + path, json={"prompt": "x"},
                          headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401, path
    assert httpx.get(hard.url + "/health").status_code == 200
    assert metric(hard, "tuneserve:api_key_failures_total") == before + 4


FATAL_SERVER = """
import sys, uvicorn
from tuneserve import faults
from tuneserve.engine_args import EngineArgs
from tuneserve.faults import Fault
from tuneserve.server.app import ServerSettings, build_app
faults.ACTIVE = faults.FaultInjector([Fault("forward"), Fault("reset")])
args = EngineArgs(model=sys.argv[1], kv_cache_memory_bytes=int(sys.argv[3]), max_model_len=256)
uvicorn.run(build_app(args, ServerSettings()), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def test_a_failed_reset_exits_the_process_non_zero_after_answering(tiny_dirs):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FATAL_SERVER, str(tiny_dirs["llama"]), str(port),
                             str(TINY_KV_BYTES)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(30) == 70
        assert "cannot recover" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_oversized_headers_are_refused_and_the_server_serves_on(hard):
    r = httpx.post(hard.url + "/v1/completions", headers={**KEY, "X-Big": "x" * (32 << 10)},
                   json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert httpx.get(hard.url + "/health").status_code == 200
