"""A serve run stops once it surely misses a latency SLO: exact thresholds, valid lower bounds, and a real
overloaded run judged the same with and without stopping (on == off), in a fraction of the requests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import TINY_KV_BYTES

from tuneserve.bench.early_stop import lower_bounds, stopper, surely_missed
from tuneserve.bench.points import Point, judge
from tuneserve.bench.serve import RequestRecord
from tuneserve.bench.slo import latency_value, parse_slos
from tuneserve.bench.sweep_serve import ServeSession


def _bounds(ttfts):
    return [{"ttft": t, "tpot": 0.0, "e2el": t} for t in ttfts]


def test_a_p99_over_200_requests_is_sure_once_three_lower_bounds_are_over():
    slo = parse_slos("ttft_p99<=1s")
    assert surely_missed(slo, _bounds([0.0] * 197 + [1.4] * 3)) is None  # over the bound, not over 1.5x it
    assert surely_missed(slo, _bounds([0.0] * 197 + [1.4] * 3), margin=1.0)
    two = [0.0] * 198 + [5.0, 5.0]
    three = [0.0] * 197 + [5.0, 5.0, 5.0]
    assert surely_missed(slo, _bounds(two)) is None
    assert np.percentile(two, 99) <= 1.0  # the rest could still be anything below: two do not decide
    assert "3 of 200" in surely_missed(slo, _bounds(three))
    assert np.percentile(three, 99) > 1.0
    # p50 over 10: n - floor(0.5 * 9) = 6 requests decide it
    p50 = parse_slos("ttft_p50<=1s")
    assert surely_missed(p50, _bounds([0.0] * 5 + [2.0] * 5)) is None
    assert "6 of 10 requests already over 1.5x" in surely_missed(p50, _bounds([0.0] * 4 + [2.0] * 6))


def test_a_mean_is_sure_once_the_lower_bounds_sum_over_it():
    slo = parse_slos("tpot_mean<=100ms")
    assert surely_missed(slo, [{"tpot": 0.29}, {"tpot": 0.0}]) is None
    assert surely_missed(slo, [{"tpot": 0.31}, {"tpot": 0.0}])


def test_lower_bounds_of_requests_in_flight_never_exceed_what_they_end_with():
    waiting = RequestRecord(0, 10, 5, sent=True, send_s=1.0)
    assert lower_bounds(waiting, now=4.0) == {"ttft": 3.0, "tpot": 0.0, "e2el": 3.0}
    streaming = RequestRecord(1, 10, 5, sent=True, send_s=1.0, chunk_s=[2.0, 2.5])
    b = lower_bounds(streaming, now=4.0)
    assert b == {"ttft": 1.0, "tpot": 0.5, "e2el": 3.0}
    streaming.chunk_s += [5.0, 5.5, 6.0]  # it goes on and ends later: every latency is at least its bound
    streaming.output_tokens, streaming.done = 5, True
    end = lower_bounds(streaming, now=9.0)
    assert all(end[k] >= b[k] for k in b) and end["tpot"] == pytest.approx(1.0)
    assert lower_bounds(RequestRecord(2, 10, 5), now=9.0) == {"ttft": 0.0, "tpot": 0.0, "e2el": 0.0}


def test_only_latency_ceilings_can_stop_a_run():
    assert stopper(parse_slos("ppl_increase<=2%,output_tok_s>=10")) is None
    assert stopper(parse_slos("ttft_p99<=2s")) is not None


def test_an_overloaded_run_stops_early_and_is_judged_as_the_whole_run(tiny_dirs):
    """Every request at once against a 1 ms TTFT bound: the stopped run and the whole run both fail it; the
    stopped one has its cut-off requests as lower bounds, kept out of goodput."""
    slos = parse_slos("ttft_p90<=1ms")
    args = {"model": str(tiny_dirs["llama"]), "kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024,
            "max_num_seqs": 2}
    n = 40
    with ServeSession(str(tiny_dirs["llama"]), args, threads=1) as s:
        cut = s.run("random", n, 24, 400.0, seed=3, stop=stopper(slos))
        assert s.wait_idle() >= 0 and not s.engine.has_unfinished_requests()  # the cut-off requests left
        whole = s.run("random", n, 24, 400.0, seed=3)
    assert "ttft_p90<=1ms surely missed" in cut["stopped"] and "stopped" not in whole
    assert cut["idle_wait_s"] >= 0 and whole["idle_wait_s"] >= 0
    partial = [r for r in cut["requests"] if r.get("partial")]
    assert len(cut["requests"]) == n and 0 < len(partial) and cut["num_requests"] == n - len(partial)
    assert cut["failed"] == 0 and whole["failed"] == 0 and whole["num_requests"] == n
    lower, full = latency_value(cut["requests"], "ttft_p90"), latency_value(whole["requests"], "ttft_p90")
    assert 1e-3 < lower and 1e-3 < full
    for metrics in (cut, whole):
        j = judge(Point({}, 400.0, "serve", n, [metrics, metrics]), slos, {})
        assert not j.mean_pass and j.states["ttft_p90<=1ms"] == "fail" and j.state == "fail"
    assert math.isfinite(cut["output_tok_s"])


def test_tables_say_how_many_runs_of_a_point_stopped():
    from tuneserve.bench.points import runs_label

    assert runs_label(200, [{}, {}, {}]) == "200x3"
    assert runs_label(200, [{"stopped": "ttft_p99<=2s surely missed"}, {}]) == "200x2 (1 stopped)"
