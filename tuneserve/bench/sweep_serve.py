"""Serve-mode sweep points: the engine behind the HTTP server, loaded by `bench serve` at a request rate."""

from __future__ import annotations

from typing import Any

from tuneserve.bench.workloads import build_workload


def measure_serve(model: str, engine_args: dict[str, Any], workload: str, num_prompts: int, output_len: int,
                  rate: float | None) -> dict[str, Any]:
    """Start a server for the point, send the workload at `rate` req/s (inf: all at once), and measure."""
    from tuneserve.bench.load import BenchRequest
    from tuneserve.bench.serve import run_benchmark
    from tuneserve.engine_args import EngineArgs
    from tuneserve.server.app import ServerSettings
    from tuneserve.server.launch import BackgroundServer

    with BackgroundServer(EngineArgs.from_dict(engine_args), ServerSettings(max_waiting_requests=10**6)) as srv:
        tok = srv.state.engine.engine.tokenizer
        work = build_workload(tok, workload, num_prompts, output_len)
        reqs = [BenchRequest(p, output_len) for p in work.prompts]
        res = run_benchmark(srv.url, reqs, request_rate=float("inf") if rate is None else rate, progress=False)
    m = res["metrics"]
    ms = 1e-3

    def sec(key: str) -> float | None:
        return None if m.get(key) is None else m[key] * ms

    return {"output_tok_s": m["output_throughput"], "total_tok_s": m["total_token_throughput"],
            "request_throughput": m["request_throughput"], "elapsed_s": m["duration_s"],
            "num_requests": m["completed"], "failed": m["failed"],
            "ttft_p50_s": sec("median_ttft_ms"), "ttft_p99_s": sec("p99_ttft_ms"),
            "tpot_p50_s": sec("median_tpot_ms"), "tpot_p99_s": sec("p99_tpot_ms"),
            "itl_p50_s": sec("median_itl_ms"), "itl_p99_s": sec("p99_itl_ms"),
            "e2el_p50_s": sec("median_e2el_ms"), "e2el_p99_s": sec("p99_e2el_ms"),
            "requests": [{"ttft": r["ttft_s"], "tpot": r["tpot_s"], "e2el": r["e2el_s"]} for r in res["requests"]]}
