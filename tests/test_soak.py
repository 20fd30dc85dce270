"""`bench soak` and `bench overload`: their checks on synthetic answers, then real runs against in-process
servers: soaks on SmolLM2 with n-gram speculation (20 s by default, 10 minutes in the slow set), and a short
overload on the tiny model with a waiting limit of 2."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer, free_port

from tuneserve.bench import overload, probe, soak
from tuneserve.bench.exchange import Exchange
from tuneserve.bench.soak_workload import CHAT, COMPLETIONS, MODES, Job, Workload
from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings

SPEC = {"method": "ngram", "num_speculative_tokens": 4}
IDLE_METRICS = """# TYPE tuneserve:kv_blocks_in_use gauge
tuneserve:kv_blocks_in_use{model_name="m"} %(blocks)s
# TYPE tuneserve:kv_block_refs gauge
tuneserve:kv_block_refs{model_name="m"} 0.0
# TYPE tuneserve:engine_live_requests gauge
tuneserve:engine_live_requests{model_name="m"} 0.0
# TYPE tuneserve:num_requests_running gauge
tuneserve:num_requests_running{model_name="m"} 0.0
# TYPE tuneserve:num_requests_waiting gauge
tuneserve:num_requests_waiting{model_name="m"} 0.0
# HELP tuneserve:engine_errors Engine errors by kind.
# TYPE tuneserve:engine_errors counter
%(errors)s
# TYPE tuneserve:server_asyncio_tasks gauge
tuneserve:server_asyncio_tasks %(tasks)s
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes %(rss)s
"""


def metrics_text(blocks: float = 0, tasks: float = 3, rss: float = 1 << 30, errors: str = "") -> str:
    return IDLE_METRICS % {"blocks": blocks, "tasks": tasks, "rss": rss, "errors": errors}


# ----- pure parts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:9",
                                 "https://127.0.0.2:443"])
def test_loopback_urls_are_accepted(url):
    assert probe.require_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000",
                                 "http://127.0.0.1.example.com:80", "ftp://127.0.0.1/", "127.0.0.1:8000",
                                 "http://localhost.example.com"])
def test_other_urls_are_refused_before_any_connection(url):
    with pytest.raises(ValueError, match="loopback"):
        probe.require_loopback(url)
    with pytest.raises(ValueError, match="loopback"):
        probe.make_client(url)
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(soak.run_soak(soak.SoakConfig(url, duration=1)))
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(overload.run_overload(overload.OverloadConfig(url), progress=False))


def test_reports_mask_the_api_key():
    assert probe.public_config(soak.SoakConfig("http://127.0.0.1:1", api_key="sekret"))["api_key"] == "***"
    assert probe.public_config(overload.OverloadConfig("http://127.0.0.1:1"))["api_key"] is None


def test_idle_metrics_pass_the_leak_checks_and_each_leak_fails_its_own():
    idle = probe.parse_metrics(metrics_text())
    assert idle[probe.ERRORS] == 0  # an exported counter without samples reads as 0
    assert not probe.failed(probe.leak_checks(idle, idle, True, 64))
    cases = {"kv_blocks_in_use": metrics_text(blocks=2), "leaked asyncio tasks": metrics_text(tasks=5),
             "engine errors": metrics_text(errors='tuneserve:engine_errors_total{kind="step",model_name="m"} 1.0'),
             "RSS growth (MiB)": metrics_text(rss=(1 << 30) + (100 << 20))}
    for name, text in cases.items():
        bad = probe.failed(probe.leak_checks(idle, probe.parse_metrics(text), True, 64))
        assert [c.name for c in bad] == [name]
    missing = probe.parse_metrics(metrics_text().replace("kv_block_refs", "something_else"))
    assert [c.detail for c in probe.failed(probe.leak_checks(idle, missing, True, None))] == ["not exported"]
    assert not probe.is_idle(missing) and not probe.is_idle(idle, task_baseline=2) and probe.is_idle(idle, 3)


def test_a_server_that_stopped_answering_fails_the_idle_check_instead_of_crashing():
    async def settle() -> tuple:
        async with probe.make_client(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
            return await probe.settle(client, timeout=1)

    after, idle, _, error = asyncio.run(settle())
    assert (after, idle) == ({}, False) and "/metrics failed: ConnectError" in error
    checks = probe.failed(probe.leak_checks(probe.parse_metrics(metrics_text()), after, idle, 64, error))
    assert checks[0].name == "server went idle" and checks[0].detail == error and len(checks) == 9


def test_workload_is_seeded_and_covers_the_mix():
    def draws(workload_seed: int, seed: int) -> list[Job]:
        w, rng = Workload("m", seed=workload_seed, max_tokens=8), random.Random(seed)
        return [w.draw(rng) for _ in range(400)]

    w, jobs = Workload("m", seed=3, max_tokens=8), draws(3, 7)
    assert [j.body for j in jobs] == [j.body for j in draws(3, 7)]
    assert [j.body for j in jobs] != [j.body for j in draws(4, 7)] != [j.body for j in draws(3, 8)]
    assert {j.mode for j in jobs} == set(MODES) and {j.path for j in jobs} == {COMPLETIONS, CHAT}
    assert {j.body["n"] for j in jobs} == {1, 2, 3} and any(j.num_choices == 2 * j.body["n"] for j in jobs)
    assert any(j.greedy for j in jobs) and any(not j.greedy for j in jobs)
    assert all(1 <= j.body["max_tokens"] <= 8 for j in jobs)
    forced = w.draw(random.Random(0), "abort", greedy=True)
    assert forced.mode == "abort" and forced.greedy and forced.stop_after == 0 and forced.body["stream"]
    shared = [j for j in jobs if j.path == COMPLETIONS and isinstance(j.body["prompt"], str)
              and j.body["prompt"].startswith(w.prefixes[0])]
    assert len(shared) > 20 and len({j.body["prompt"] for j in shared}) > 15  # one prefix, many suffixes
    assert all(j.body.get("stream") for j in jobs if j.mode in ("stream", "disconnect", "abort"))
    assert not any(j.body.get("stream") for j in jobs if j.mode in ("json", "json-abort"))


def test_classification_and_greedy_comparison():
    job = Job(COMPLETIONS, {"prompt": ["a", "b"], "n": 2, "temperature": 0}, "stream")
    ok = Exchange(status=200, done=True, finish={i: "length" for i in range(4)})
    assert soak.classify(job, ok, cancelled=False) == ("completed", "")
    short = Exchange(status=200, done=True, finish={0: "length", 1: "length", 2: None})
    assert soak.classify(job, short, cancelled=False)[0] == "failed"
    assert soak.classify(job, Exchange(status=503, error="HTTP 503"), cancelled=False) == ("failed", "HTTP 503")
    assert soak.classify(job, Exchange(status=200, closed_early=True), cancelled=False)[0] == "disconnected"
    assert soak.classify(job, Exchange(), cancelled=True)[0] == "aborted"
    seen = {0: "Paris is", 1: "x", 2: "y", 3: "z"}
    assert soak.compare(job, seen, dict(seen)) == []
    (m,) = soak.compare(job, seen, {**seen, 0: "Paris was"})
    assert m["choice"] == 0 and m["first_difference_at"] == 6 and "stream" not in m["body"]


def test_overload_rows_count_every_request_and_flag_silent_drops():
    def shot(status=None, retry="1", hung=False, done=True, latency=0.01) -> overload.Shot:
        ex = Exchange(sent=0.0, status=status, retry_after=retry if status == 503 else None, done=done,
                      finish={0: "length"} if status == 200 else {}, chunk_s=[0.2] if status == 200 else [],
                      error=None if status == 200 else f"HTTP {status}", ended=latency)
        return overload.Shot(ex, hung)

    good = [shot(200), shot(200), shot(503), shot(503, latency=0.02)]
    row = overload.summarize(3.0, 6.0, good, 1.0)
    assert (row["sent"], row["admitted"], row["completed"], row["rejected"]) == (4, 2, 2, 2)
    assert not probe.failed(overload.level_checks(row, good, 500))
    bad = good + [shot(503, retry=None), shot(200, hung=True), shot(500), shot(200, done=False)]
    row = overload.summarize(3.0, 6.0, bad, 1.0)
    names = {c.name for c in probe.failed(overload.level_checks(row, bad, 500))}
    assert names == {"x3: hung", "x3: other errors", "x3: admitted completed", "x3: 503 without Retry-After",
                     "x3: admitted + rejected == sent"}
    assert [overload.retry_after_s(v) for v in ("2", "0.5", None, "Wed, 21 Oct 2015 07:28:00 GMT")] == [2, 0.5, 1, 1]
    slow = [shot(503, latency=2.0)]
    assert [c.name for c in probe.failed(overload.level_checks(overload.summarize(3, 1, slow, 1), slow, 500))] == [
        "x3: p99 503 latency (ms)"]


# ----- against SmolLM2 ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def soak_server():
    from tuneserve.weights.sources import alias_path

    if not alias_path("smollm2-135m").is_file():
        pytest.skip("smollm2-135m is not in the cache (tuneserve pull smollm2-135m)")
    # 4 running sequences and a KV cache of 364 tokens (45 KiB each): requests queue and get preempted, while
    # max_model_len 320 keeps every request small enough to fit the cache alone (soak prompts stay under 250)
    # fp32 activations: "greedy = alone" checks the scheduler and the KV cache, and with the int8 ones (the default
    # on VNNI CPUs) a request's numerics depend on how many rows share its steps: up to 47 rows take int8
    # activations, more take bf16 tiles, and a near-tie can then break either way
    args = EngineArgs(model="smollm2-135m", speculative_config=SPEC, max_model_len=320, max_num_seqs=4,
                      kv_cache_memory_bytes=16 << 20, quant_activations="fp32")
    s = LiveServer(args, ServerSettings())
    yield s
    s.stop()


def explain(result: dict) -> str:
    """The failed checks, failures and mismatches, for an assertion message."""
    bad = [c for c in result["checks"] if not c["ok"]]
    return json.dumps({"failed_checks": bad, "failures": result["failures"][:3],
                       "mismatches": result["greedy"]["mismatches"][:3]}, indent=1, default=str)[:6000]


def run_soak(url: str, seconds: float, **kw) -> dict:
    cfg = soak.SoakConfig(url, duration=seconds, concurrency=6, seed=1, max_tokens=12, progress=False, **kw)
    result = asyncio.run(soak.run_soak(cfg))
    soak.print_report(result)
    return result


def test_short_soak_leaks_nothing_and_greedy_matches_alone(soak_server):
    result = run_soak(soak_server.url, 20, verify_max=4)
    assert result["ok"], explain(result)
    c = result["counts"]
    assert c["failed"] == 0 and c["completed"] > 0 and c["disconnected"] + c["aborted"] > 0, c
    assert result["greedy"]["verified"] > 0 and not result["greedy"]["mismatches"]
    deltas = result["server_deltas"]
    assert deltas["draft_tokens"] > 0 and deltas["prefix_hits"] > 0  # speculation on, shared prefixes shared


@pytest.mark.slow
def test_ten_minute_soak(soak_server):
    result = run_soak(soak_server.url, 600, verify_max=64)
    assert result["ok"], explain(result)
    c = result["counts"]
    assert min(c["completed"], c["disconnected"], c["aborted"]) > 0, c


def test_overload_sheds_with_503_and_retry_after_and_drops_nothing(tiny_llama):
    # the tiny model keeps this quick; with 2 running sequences and 1 waiting, 3x capacity overflows at once
    args = EngineArgs(model=str(tiny_llama), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256, max_num_seqs=2)
    s = LiveServer(args, ServerSettings(served_model_name="tiny", max_waiting_requests=1))
    try:
        cfg = overload.OverloadConfig(s.url, concurrency=2, capacity_seconds=2, levels=(3.0,), level_seconds=4,
                                      max_tokens=32, prompt_words=8, request_timeout=60, max_reject_ms=2000)
        result = asyncio.run(overload.run_overload(cfg, progress=False))
    finally:
        s.stop()
    overload.print_report(result)
    (row,) = result["levels"]
    assert row["rejected"] > 0 and row["no_retry_after"] == 0, row
    assert row["hung"] == 0 and row["errors"] == 0 and row["completed"] == row["admitted"] > 0, row
    assert row["admitted"] + row["rejected"] == row["sent"], row
    assert result["ok"], [c for c in result["checks"] if not c["ok"]]
