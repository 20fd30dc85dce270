"""Serve-mode points: the engine behind the HTTP server, loaded by `bench serve` at an offered rate.

One ServeSession loads a configuration once and runs any number of runs against it (rates, repeats).
A run sends `num_prompts` requests with Poisson arrivals at `rate` req/s (inf: all at once); its prompts
and arrival times come from one seed, which `run_seed` derives from the rate and the repeat, so every
configuration sees the very same requests at the same rate and repeat (and no run reuses another's prompts,
which prefix caching would turn into a head start).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuneserve.bench.records import torch_threads
from tuneserve.bench.workloads import build_workload

if TYPE_CHECKING:
    from tuneserve.bench.serve import StopRule

# Sessions of `replicas` > 1 engines behind one endpoint (Ray Serve): tuneserve.deploy.lab adds its factory
# here when imported (deploy sits above bench), as the CLI does; (model, engine args, threads, replicas) -> session
REPLICA_SESSIONS: list[Callable[[str, dict, int | None, int], Any]] = []


def session_for(model: str, args: dict[str, Any], threads: int | None, replicas: int | None) -> Any:
    """The session that serves a grid point (its engine arguments, threads and replicas): one in-process
    server, or `replicas` of them on Ray Serve (the threads shared out among them)."""
    replicas = int(replicas or 1)
    if replicas == 1:
        return ServeSession(model, args, threads)
    if not REPLICA_SESSIONS:
        raise ValueError("replicas > 1 runs on Ray Serve: pip install 'tuneserve[ray]' (and run through the CLI, "
                         "or import tuneserve.deploy.lab)")
    return REPLICA_SESSIONS[0](model, args, threads, replicas)


def run_seed(rate: float | None, repeat: int) -> int:
    """The seed of a run's prompts and arrivals: a function of the offered rate and the repeat only."""
    return zlib.crc32(f"{'inf' if rate is None or math.isinf(rate) else f'{rate:.6g}'}/{repeat}".encode()) & 0xFFFF


IDLE_TIMEOUT_S = 300.0  # how long a run waits for the requests of the one before it to leave the engine


class ServeSession:
    """`with ServeSession(model, engine_args, threads) as s: s.run(...)`: one server, many runs."""

    def __init__(self, model: str, engine_args: dict[str, Any], threads: int | None = None) -> None:
        self.model, self.engine_args, self.threads = model, engine_args, threads
        self.load_s = 0.0
        self.cost: dict[str, int] = {}

    def __enter__(self) -> ServeSession:
        from tuneserve.engine_args import EngineArgs
        from tuneserve.server.app import ServerSettings
        from tuneserve.server.launch import BackgroundServer

        self._threads = torch_threads(self.threads)
        self._threads.__enter__()
        t0 = time.perf_counter()
        try:
            self.srv = BackgroundServer(EngineArgs.from_dict(self.engine_args),
                                        ServerSettings(max_waiting_requests=10**6))
        except BaseException:
            self._threads.__exit__(None, None, None)
            raise
        self.load_s = time.perf_counter() - t0
        self.engine = self.srv.state.engine.engine
        self.cost = self.engine.footprint()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.srv.stop()
        finally:
            self._threads.__exit__(None, None, None)
            self.engine = self.srv = None  # the next configuration loads into the memory this one held

    def run(self, workload: str, num_prompts: int, output_len: int, rate: float | None,
            seed: int = 0, stop: StopRule | None = None) -> dict[str, Any]:
        """Send the workload at `rate` req/s (None or inf: all at once) and measure what clients see
        (`stop`: end the run early when it fires, bench/early_stop.py). The run starts once the engine is
        idle, so that no request a stopped run cut off is still being aborted or stepped."""
        waited = self.wait_idle()
        return run_at(self.srv.url, self.engine.tokenizer, workload, num_prompts, output_len, rate, seed,
                      {**self.cost, "load_s": self.load_s, "idle_wait_s": waited}, stop)

    def wait_idle(self, timeout_s: float = IDLE_TIMEOUT_S) -> float:
        """Wait until the engine holds no request (RuntimeError past timeout_s); returns the seconds waited."""
        t0 = time.perf_counter()
        while self.engine.has_unfinished_requests() or self.srv.state.engine.num_waiting:
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"the server still held requests {timeout_s:g}s after the last run")
            time.sleep(0.05)
        return time.perf_counter() - t0


def run_at(url: str, tokenizer: Any, workload: str, num_prompts: int, output_len: int, rate: float | None,
           seed: int, extra: dict[str, Any], stop: StopRule | None = None) -> dict[str, Any]:
    """One run against a server at url: the workload at `rate` req/s; what clients see, with `extra`."""
    from tuneserve.bench.load import BenchRequest
    from tuneserve.bench.serve import run_benchmark

    work = build_workload(tokenizer, workload, num_prompts, output_len, seed=seed)
    reqs = [BenchRequest(p, output_len) for p in work.prompts]
    res = run_benchmark(url, reqs, request_rate=math.inf if rate is None else rate, seed=seed, progress=False,
                        stop=stop)
    return {**serve_metrics(res), **extra, "seed": seed}


def serve_metrics(res: dict) -> dict[str, Any]:
    """A results-file record's metrics (seconds) from a `bench serve` result (milliseconds). A stopped run
    (bench/early_stop.py) says why in "stopped", and its cut-off requests come as their lower bounds,
    marked "partial"."""
    m = res["metrics"]

    def sec(key: str) -> float | None:
        return None if m.get(key) is None else m[key] * 1e-3

    return {"output_tok_s": m["output_throughput"], "total_tok_s": m["total_token_throughput"],
            "request_throughput": m["request_throughput"], "elapsed_s": m["duration_s"],
            "num_requests": m["completed"], "failed": m["failed"],
            "ttft_p50_s": sec("median_ttft_ms"), "ttft_p99_s": sec("p99_ttft_ms"),
            "tpot_p50_s": sec("median_tpot_ms"), "tpot_p99_s": sec("p99_tpot_ms"),
            "itl_p50_s": sec("median_itl_ms"), "itl_p99_s": sec("p99_itl_ms"),
            "e2el_p50_s": sec("median_e2el_ms"), "e2el_p99_s": sec("p99_e2el_ms"),
            "requests": [{"ttft": r["ttft_s"], "tpot": r["tpot_s"], "e2el": r["e2el_s"]}
                         for r in res["requests"] if r["success"] and r["done"]]
            + [{**b, "partial": True} for b in res.get("cut", [])],
            **({"stopped": res["stopped"]} if res.get("stopped") else {})}


def measure_serve(model: str, engine_args: dict[str, Any], workload: str, num_prompts: int, output_len: int,
                  rate: float | None, threads: int | None = None) -> dict[str, Any]:
    """One run of one configuration in its own server (what `tuneserve sweep --mode serve` measures)."""
    with ServeSession(model, engine_args, threads) as s:
        return s.run(workload, num_prompts, output_len, rate)
