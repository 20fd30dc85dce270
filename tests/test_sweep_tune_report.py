"""The trade-off lab: a resumable sweep, SLO-driven choice, and an HTML report checked in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from conftest import TINY_KV_BYTES

from tuneserve.bench import sweep, tune
from tuneserve.bench.records import load_records
from tuneserve.bench.report import pareto, render_report, serve_rows
from tuneserve.bench.sweep import grid_points, parse_grid, run_sweep


def test_grid_parsing_and_points():
    grid = parse_grid(["max_num_seqs=1,4", "quantization=none,int8", "speculative=off,ngram"])
    assert grid == {"max_num_seqs": [1, 4], "quantization": [None, "int8"], "speculative": ["off", "ngram"]}
    assert len(grid_points(grid)) == 8 and grid_points(grid)[0] == {"max_num_seqs": 1, "quantization": None,
                                                                    "speculative": "off"}
    with pytest.raises(ValueError, match="unknown grid axis"):
        parse_grid(["warp_speed=9"])
    args = sweep.engine_args_for("m", {"speculative": "ngram", "max_num_seqs": 2, "threads": 1})
    assert args["speculative_config"]["method"] == "ngram" and args["max_num_seqs"] == 2 and "threads" not in args
    assert parse_grid(["threads=1,2"]) == {"threads": [1, 2]}


def test_every_lab_configuration_gets_one_kv_cache_size_whatever_memory_is_free(monkeypatch):
    """Resolved per load, the default KV cache shrank as an in-process tune went on, and later configurations
    looked cheaper. The lab resolves it once per process; a size given in the base or the point wins."""
    from tuneserve import engine_args

    sweep.lab_kv_memory.cache_clear()
    try:
        monkeypatch.setattr(engine_args, "available_memory_bytes", lambda: 4 << 30)
        first = sweep.engine_args_for("m", {"max_num_seqs": 64})["kv_cache_memory_bytes"]
        monkeypatch.setattr(engine_args, "available_memory_bytes", lambda: 2 << 30)
        later = sweep.engine_args_for("m", {"max_num_seqs": 8})["kv_cache_memory_bytes"]
        assert first == later == int((4 << 30) * engine_args.KV_MEMORY_FRACTION)
        assert sweep.engine_args_for("m", {}, {"kv_cache_memory_bytes": 123})["kv_cache_memory_bytes"] == 123
        assert sweep.engine_args_for("m", {"kv_cache_memory_bytes": 7})["kv_cache_memory_bytes"] == 7
    finally:
        sweep.lab_kv_memory.cache_clear()


def test_sweep_writes_records_and_resumes(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"
    base = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024}
    grid = {"max_num_seqs": [1, 2]}
    recs = run_sweep(str(tiny_dirs["llama"]), grid, "random", str(out), num_prompts=3, output_len=4, base=base)
    assert [r["config"] for r in recs] == [{"max_num_seqs": 1}, {"max_num_seqs": 2}]
    lines = load_records(out)
    assert len(lines) == 2 and all(r["metrics"]["output_tokens"] == 12 for r in lines)
    assert all(len(r["metrics"]["requests"]) == 3 and r["metrics"]["weight_bytes"] > 0 for r in lines)
    assert all(r["metrics"]["threads"] == torch.get_num_threads() and r["num_prompts"] == 3 for r in lines)
    calls = []
    monkeypatch.setattr(sweep, "measure_offline", lambda *a, **k: calls.append(a) or {"output_tok_s": 1.0})
    again = run_sweep(str(tiny_dirs["llama"]), {"max_num_seqs": [1, 2, 4]}, "random", str(out), 3, 4, base)
    assert calls and len(calls) == 1 and [r["config"] for r in again] == [{"max_num_seqs": 4}]
    assert len(load_records(out)) == 3


def test_sweep_repeats_each_point_and_resumes_the_missing_runs(tmp_path, monkeypatch):
    out = tmp_path / "results.jsonl"
    calls = []
    monkeypatch.setattr(sweep, "measure_offline", lambda *a, **k: calls.append(a[1]) or {"output_tok_s": 1.0})
    recs = run_sweep("m", {"max_num_seqs": [1, 2]}, "random", str(out), 3, 4, repeats=3)
    assert [(r["config"]["max_num_seqs"], r["repeat"]) for r in recs] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1),
                                                                           (2, 2)]
    assert "repeat" not in json.loads(recs[0]["key"]) and json.loads(recs[1]["key"])["repeat"] == 1
    assert len(calls) == 6
    more = run_sweep("m", {"max_num_seqs": [1, 2]}, "random", str(out), 3, 4, repeats=4)
    assert [(r["config"]["max_num_seqs"], r["repeat"]) for r in more] == [(1, 3), (2, 3)]
    assert run_sweep("m", {"max_num_seqs": [1, 2]}, "random", str(out), 3, 4, repeats=2) == []
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        run_sweep("m", {"max_num_seqs": [1]}, "random", str(out), 3, 4, repeats=0)


def rec(config, tpots, ttft=0.1, elapsed=10.0, kind="offline", system="tuneserve", **metrics):
    reqs = [{"ttft": ttft, "tpot": t, "e2el": ttft + 10 * t} for t in tpots]
    return {"kind": kind, "system": system, "model": "m", "workload": "corpus", "config": config,
            "metrics": {"elapsed_s": elapsed, "requests": reqs, "output_tok_s": len(tpots) / elapsed * 64, **metrics}}


def test_report_tables_give_each_offline_point_its_runs_mean_and_interval():
    from tuneserve.bench.report import latency_rows, precision_rows

    runs = [rec({"max_num_seqs": 1, "quantization": None}, [0.03] * 10, elapsed=e) for e in (40.0, 41.0, 42.0)]
    (row,) = latency_rows(runs)
    assert row["requests"] == "10x3" and row["batch"] == 1
    assert row["tok_s"] == "15.6 ±0.947"  # 640 / 40, 41, 42 s: mean 15.61, t(2) * sd / sqrt(3)
    (prec,) = precision_rows(runs)
    assert prec["tok_s_batch1"] == row["tok_s"] and prec["largest_batch"] == 1


def synthetic():
    return [
        rec({"max_num_seqs": 1, "quantization": None}, [0.03] * 10, elapsed=40),
        rec({"max_num_seqs": 16, "quantization": None}, [0.07] * 19 + [0.09], elapsed=10),
        rec({"max_num_seqs": 64, "quantization": None}, [0.12] * 20, ttft=2.0, elapsed=6),
        rec({"max_num_seqs": 16, "quantization": "int4"}, [0.05] * 20, elapsed=7),
        {"kind": "quality", "model": "m", "config": {"quantization": None}, "metrics": {"perplexity": 20.0}},
        {"kind": "quality", "model": "m", "config": {"quantization": "int4"},
         "metrics": {"perplexity": 26.0, "kl_divergence": 0.2, "top1_agreement": 0.8}},
    ]


def serve_runs(config, rate, ttfts, num_prompts=200):
    return [{"kind": "serve", "mode": "serve", "system": "tuneserve", "model": "m", "workload": "corpus",
             "rate": rate, "config": config, "repeat": k, "num_prompts": num_prompts, "output_len": 64,
             "metrics": {"elapsed_s": 10.0, "output_tok_s": 100.0 + k, "failed": 0,
                         "requests": [{"ttft": t, "tpot": t / 10, "e2el": 2 * t}] * num_prompts}}
            for k, t in enumerate(ttfts)]


def test_report_gives_each_serve_point_its_interval_and_request_count():
    rows = serve_rows(serve_runs({"max_num_seqs": 16}, 2.0, [0.1, 0.2, 0.3]) + serve_runs({"max_num_seqs": 16}, 4.0,
                                                                                          [0.5], num_prompts=32))
    assert rows == [
        {"system": "tuneserve", "workload": "corpus", "config": '{"max_num_seqs": 16}', "rate": 2.0,
         "requests": "200x3", "output_tok_s": "101 ±2.48", "ttft_p99_ms": "200 ±248", "tpot_p99_ms": "20 ±24.8"},
        {"system": "tuneserve", "workload": "corpus", "config": '{"max_num_seqs": 16}', "rate": 4.0,
         "requests": "32x1", "output_tok_s": "100 (1 run)", "ttft_p99_ms": "500 (1 run)",
         "tpot_p99_ms": "50 (1 run)"}]


def test_serve_command_is_ready_to_run():
    cmd = tune.serve_command("smollm2-135m", {"max_num_seqs": 16, "quantization": "int8", "speculative": "ngram"})
    assert cmd.startswith("tuneserve serve smollm2-135m --max-num-seqs 16 --quantization int8")
    assert "--speculative-config" in cmd and '"method": "ngram"' in cmd
    cmd = tune.serve_command("smollm2-135m", {"quantization": "gguf", "threads": 1})
    assert cmd == "OMP_NUM_THREADS=1 tuneserve serve smollm2-135m --quantization gguf"


def test_tune_on_a_tiny_model_twice_from_scratch(tiny_dirs, tmp_path, capsys):
    """The real path (HTTP server, Poisson arrivals, repeats, records): two tunes from scratch agree, and a
    third on the first one's records measures nothing and answers the same."""
    from tuneserve.cli.main import main

    space = {"quantization": [None, "int8"], "kv_cache_memory_bytes": [TINY_KV_BYTES], "max_model_len": [1024]}
    args = ["tune", "--model", str(tiny_dirs["llama"]), "--slo", "ttft_p99<=60s,tpot_p99<=20s", "--workload",
            "random", "--budget-minutes", "10", "--space", json.dumps(space), "--num-prompts", "2", "--output-len", "2",
            "--repeats", "2", "--max-repeats", "2", "--start-rate", "50", "--min-rate", "50", "--max-rate", "50",
            "--no-progress"]
    answers = []
    for results in ("a.jsonl", "b.jsonl", "a.jsonl"):
        assert main([*args, "--results", str(tmp_path / results)]) == 0
        out = capsys.readouterr().out
        answers.append([line for line in out.splitlines() if line.startswith(("chosen:", "tie with"))])
        assert "ttft_p99 over 2 requests per run is nearly their maximum" in out
    recs = load_records(tmp_path / "a.jsonl")
    assert {r["rate"] for r in recs} == {50.0} and sorted(r["repeat"] for r in recs) == [0, 0, 1, 1]
    assert all(len(r["metrics"]["requests"]) == 2 and r["metrics"]["threads"] >= 1 for r in recs)
    # the same workload either way, and int8 holds fewer bytes: a tie goes to it, every time
    assert answers[0][0].startswith('chosen: {"kv_cache_memory_bytes": 2097152, "max_model_len": 1024, '
                                    '"quantization": "int8"}: meets every SLO at 50 req/s')
    assert answers[0] == answers[1] == answers[2] and answers[0][1].startswith("tie with")


def test_pareto_frontier():
    assert pareto([(10, 5), (20, 8), (15, 9), (5, 4)]) == [(5, 4), (10, 5), (20, 8)]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    records = synthetic() + serve_runs({"max_num_seqs": 16}, 2.0, [0.1, 0.2, 0.3]) + [
        rec({"max_num_seqs": 8}, [0.05] * 5, system="llama.cpp"),
        {"kind": "context", "model": "m", "config": {"attention": "full"},
         "metrics": {"context": 1024, "prefill_s": 1.0, "decode_s_per_token": 0.03, "kv_bytes": 4e7}},
        {"kind": "context", "model": "m", "config": {"attention": "full"},
         "metrics": {"context": 2048, "prefill_s": 2.5, "decode_s_per_token": 0.035, "kv_bytes": 8e7}},
    ]
    for r in records:
        r["metrics"].setdefault("tpot_p50_s", 0.05)
    page = render_report(records, tmp_path / "report")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400"]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True,
                   timeout=120)
    assert shot.stat().st_size > 10_000
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()], check=True,
                         capture_output=True, text=True, timeout=120).stdout
    check = json.loads(dom.split('<pre id="image-check">')[1].split("</pre>")[0].replace("&quot;", '"'))
    assert len(check) == 4 and all(i["w"] > 0 and i["h"] > 0 for i in check)
    for title in ("Latency vs throughput by batch size", "Precision vs quality", "Context length vs cost",
                  "Served at an offered rate", "200x3"):
        assert title in dom
    assert dom.count("<table>") == 4  # the speculation table has no measurements here


def test_serve_mode_sweep_measures_through_http(tiny_dirs, tmp_path):
    out = tmp_path / "serve.jsonl"
    base = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024}
    threads = torch.get_num_threads()
    recs = run_sweep(str(tiny_dirs["llama"]), {"max_num_seqs": [4], "threads": [1]}, "random", str(out),
                     num_prompts=4, output_len=3, base=base, rates=[float("inf"), 50.0], mode="serve")
    assert [r["rate"] for r in recs] == [float("inf"), 50.0] and torch.get_num_threads() == threads
    for r in recs:
        m = r["metrics"]
        assert m["num_requests"] == 4 and m["failed"] == 0 and len(m["requests"]) == 4 and m["threads"] == 1
        assert m["memory_bytes"] == m["weight_bytes"] + TINY_KV_BYTES
        assert all(q["ttft"] > 0 and q["e2el"] >= q["ttft"] for q in m["requests"])


def test_sweep_takes_tensor_parallel_size_as_an_axis(tiny_dirs, tmp_path):
    """Two ranks serve the point through HTTP; the record counts both ranks' weights and threads, and the
    ranks are gone when the point's server stops."""
    import multiprocessing

    base = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024}
    recs = run_sweep(str(tiny_dirs["llama"]), {"tensor_parallel_size": [1, 2], "threads": [2]}, "random",
                     str(tmp_path / "tp.jsonl"), num_prompts=4, output_len=3, base=base, rates=[float("inf")],
                     mode="serve")
    one, two = (r["metrics"] for r in recs)
    assert one["failed"] == two["failed"] == 0 and one["threads"] == two["threads"] == 2
    assert one["weight_bytes"] < two["weight_bytes"] < 2 * one["weight_bytes"]  # embedding and head replicated
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("tuneserve-tp")]
