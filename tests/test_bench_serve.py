"""`tuneserve bench serve`: arrival schedules, datasets, metric arithmetic, and runs against a live server."""

from __future__ import annotations

import json
import math
import random
import statistics
import threading
import time

import pytest
from conftest import TINY_KV_BYTES
from server_utils import LiveServer

from tuneserve.bench import load
from tuneserve.bench.serve import (
    RemoteTokenizer,
    RequestRecord,
    compute_metrics,
    parse_slo,
    percentile,
    run_benchmark,
)
from tuneserve.engine_args import EngineArgs
from tuneserve.server.app import ServerSettings

TINY_IDS = (3, 272)  # the tiny byte tokenizer's non-special ids
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def corpus_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class CharTokenizer:
    """One token per character: enough for the pure dataset functions."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def cv2(xs: list[float]) -> float:
    return statistics.pvariance(xs) / statistics.fmean(xs) ** 2


# ----- arrival schedules ----------------------------------------------------------------------------------
def test_poisson_gaps_have_mean_one_over_rate():
    times = load.arrival_times(20001, rate=4.0, burstiness=1.0, seed=0)
    assert times[0] == 0.0 and all(b > a for a, b in zip(times, times[1:]))
    g = gaps(times)
    assert statistics.fmean(g) == pytest.approx(0.25, rel=0.03)
    assert cv2(g) == pytest.approx(1.0, rel=0.06)  # exponential gaps
    assert load.arrival_times(50, 4.0, seed=1) == load.arrival_times(50, 4.0, seed=1)
    assert load.arrival_times(50, 4.0, seed=1) != load.arrival_times(50, 4.0, seed=2)


@pytest.mark.parametrize("shape", [0.25, 4.0])
def test_gamma_burstiness_sets_the_variance(shape):
    g = gaps(load.arrival_times(40001, rate=2.0, burstiness=shape, seed=3))
    assert statistics.fmean(g) == pytest.approx(0.5, rel=0.04)  # the rate does not change with burstiness
    assert cv2(g) == pytest.approx(1.0 / shape, rel=0.1)


def test_infinite_rate_sends_everything_at_once_and_bad_values_raise():
    assert load.arrival_times(7, math.inf) == [0.0] * 7
    for rate, b in ((0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0)):
        with pytest.raises(ValueError):
            load.arrival_times(3, rate, b)


# ----- datasets ---------------------------------------------------------------------------------------------
def test_random_requests_are_seeded_and_in_range():
    reqs = load.random_requests(5, 40, 7, seed=1)
    assert [(r.prompt_len, r.output_len) for r in reqs] == [(40, 7)] * 5
    assert all(1000 <= t < 20000 for r in reqs for t in r.prompt)
    assert load.fingerprint(reqs) == load.fingerprint(load.random_requests(5, 40, 7, seed=1))
    assert load.fingerprint(reqs) != load.fingerprint(load.random_requests(5, 40, 7, seed=2))
    assert len({tuple(r.prompt) for r in reqs}) == 5


def test_corpus_and_shared_prefix_requests():
    text, tok = corpus_text(), CharTokenizer()
    reqs = load.corpus_requests(tok, text, 20, 10, 50, 9, seed=0)
    assert len(reqs) == 20 and all(10 <= r.prompt_len <= 50 and r.output_len == 9 for r in reqs)
    joined = "".join(chr(t) for t in reqs[0].prompt)
    assert joined in text

    shared = load.shared_prefix_requests(tok, text, 12, 100, 8, 5, seed=0)
    prefix = shared[0].prompt[:100]
    assert all(r.prompt_len == 108 and r.prompt[:100] == prefix and r.output_len == 5 for r in shared)
    assert len({tuple(r.prompt[100:]) for r in shared}) == 12  # distinct suffixes


# ----- metrics on synthetic records -------------------------------------------------------------------------
def synthetic_records() -> list[RequestRecord]:
    a = RequestRecord(0, 10, 4, send_s=0.0, chunk_s=[0.1, 0.2, 0.3, 0.5], output_tokens=4)
    b = RequestRecord(1, 20, 2, send_s=1.0, chunk_s=[1.3, 1.4], output_tokens=2)
    c = RequestRecord(2, 30, 1, send_s=2.0, chunk_s=[2.2], output_tokens=1)
    d = RequestRecord(3, 40, 4, send_s=2.5, error="HTTP 503: overloaded")
    return [a, b, c, d]


def test_metrics_exact_values():
    recs = synthetic_records()
    a = recs[0]
    assert (a.ttft, a.e2el) == pytest.approx((0.1, 0.5))
    assert a.tpot == pytest.approx(0.4 / 3) and a.itls == pytest.approx([0.1, 0.1, 0.2])
    assert recs[2].tpot is None and recs[2].itls == [] and not recs[3].success

    m = compute_metrics(recs, duration=4.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 7)
    assert m["request_throughput"] == pytest.approx(0.75)
    assert m["output_throughput"] == pytest.approx(1.75)
    assert m["total_token_throughput"] == pytest.approx(67 / 4)
    assert m["request_goodput"] is None
    expect = {  # ms; percentiles interpolate linearly between order statistics
        "ttft": (200.0, 200.0, 280.0, 298.0),  # [100, 300, 200]
        "tpot": (350 / 3, 350 / 3, 100 + 100 / 3 * 0.9, 100 + 100 / 3 * 0.99),  # [133.3, 100]
        "itl": (125.0, 100.0, 170.0, 197.0),  # pooled [100, 100, 200, 100]
        "e2el": (1100 / 3, 400.0, 480.0, 498.0),  # [500, 400, 200]
    }
    for name, (mean, median, p90, p99) in expect.items():
        got = tuple(m[f"{s}_{name}_ms"] for s in ("mean", "median", "p90", "p99"))
        assert got == pytest.approx((mean, median, p90, p99)), name


def test_goodput_counts_requests_meeting_every_slo():
    recs = synthetic_records()
    # ttft 0.1/0.3/0.2, tpot 0.133/0.1/None, e2el 0.5/0.4/0.2; the failed request never counts
    assert compute_metrics(recs, 4.0, {"ttft": 0.25})["request_goodput"] == pytest.approx(2 / 4)
    assert compute_metrics(recs, 4.0, {"ttft": 0.25, "tpot": 0.12})["request_goodput"] == pytest.approx(1 / 4)
    assert compute_metrics(recs, 4.0, {"e2el": 0.45})["request_goodput"] == pytest.approx(2 / 4)
    loose = {"ttft": 1, "tpot": 1, "e2el": 1}
    assert compute_metrics(recs, 2.0, loose)["request_goodput"] == pytest.approx(1.5)


def test_percentile_matches_numpy_and_slo_parsing():
    np = pytest.importorskip("numpy")
    xs = [random.Random(5).random() for _ in range(37)]
    for q in (0, 12.5, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None
    assert parse_slo("ttft=0.5,tpot=0.05,e2el=10") == {"ttft": 0.5, "tpot": 0.05, "e2el": 10.0}
    assert parse_slo(None) is None
    for bad in ("latency=1", "ttft", "ttft=-1"):
        with pytest.raises(ValueError):
            parse_slo(bad)


# ----- against a live tiny server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_dirs):
    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=TINY_KV_BYTES, max_model_len=256)
    s = LiveServer(args, ServerSettings(served_model_name="tiny"))
    yield s
    s.stop()


def test_end_to_end_random_dataset(server, tmp_path):
    reqs = load.random_requests(12, 24, 16, seed=0, id_range=TINY_IDS)
    result = run_benchmark(server.url, reqs, request_rate=40.0, burstiness=0.5, seed=1, progress=False,
                           slo={"e2el": 60.0})
    m, recs = result["metrics"], result["requests"]
    assert result["config"]["model"] == "tiny"  # asked /v1/models
    assert (m["completed"], m["failed"]) == (12, 0) and len(recs) == 12
    assert m["total_output_tokens"] == 12 * 16 and m["total_input_tokens"] == 12 * 24
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    arrivals = load.arrival_times(12, 40.0, 0.5, seed=1)
    for r, arrival in zip(recs, arrivals):
        assert r["success"] and r["output_tokens"] == 16 and r["prompt_len"] == 24
        assert r["send_s"] >= r["arrival_s"] == pytest.approx(arrival)
        assert 0 < r["ttft_s"] <= r["e2el_s"] and len(r["itl_s"]) <= 15
        assert r["tpot_s"] == pytest.approx((r["e2el_s"] - r["ttft_s"]) / 15)
    path = tmp_path / "out.json"
    from tuneserve.bench.records import write_json

    write_json(path, result)
    back = json.loads(path.read_text())
    assert [r["index"] for r in back["requests"]] == list(range(12))
    assert back["metrics"]["completed"] == 12 and back["config"]["workload_sha256"] == load.fingerprint(reqs)


def test_max_concurrency_is_respected(server):
    eng = server.state.engine.engine
    seen, stop = [], threading.Event()

    def watch() -> None:  # the server's own view of how many requests it holds
        while not stop.is_set():
            seen.append(eng.scheduler.num_running + eng.scheduler.num_waiting)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reqs = load.random_requests(10, 16, 12, seed=2, id_range=TINY_IDS)
        result = run_benchmark(server.url, reqs, max_concurrency=2, progress=False)
    finally:
        stop.set()
        watcher.join()
    recs = result["requests"]
    assert result["metrics"]["completed"] == 10 and result["metrics"]["max_in_flight"] == 2
    events = sorted([(r["send_s"], 1) for r in recs] + [(r["send_s"] + r["e2el_s"], -1) for r in recs],
                    key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    assert peak <= 2
    assert 1 <= max(seen) <= 2


def test_cli_corpus_and_shared_prefix_through_the_servers_tokenizer(server, tmp_path, capsys):
    from tuneserve.cli.main import main

    text_file = tmp_path / "corpus.txt"
    text_file.write_text(corpus_text(3000, seed=4))
    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--dataset", "corpus", "--corpus", str(text_file),
               "--num-prompts", "6", "--min-input", "8", "--max-input", "40", "--output-len", "5",
               "--slo", "ttft=30,tpot=30,e2el=60", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "bench serve: tiny" in printed and "TTFT" in printed and "goodput_req_s" in printed
    data = json.loads(out.read_text())
    assert data["config"]["dataset"] == "corpus" and data["metrics"]["completed"] == 6
    assert all(8 <= r["prompt_len"] <= 40 and r["output_tokens"] == 5 for r in data["requests"])

    tok = RemoteTokenizer(server.url, "tiny")
    shared = load.shared_prefix_requests(tok, text_file.read_text(), 5, 64, 8, 4, seed=0)
    for text_prompts in (False, True):
        result = run_benchmark(server.url, shared, tokenizer=tok, text_prompts=text_prompts, progress=False)
        assert result["metrics"]["completed"] == 5
        assert all(r["prompt_len"] == 72 for r in result["requests"])  # the byte tokenizer round-trips text
