"""`tuneserve sweep`: run the engine over a grid of configurations and append one JSON record per point.

Every finished point is appended to the results file at once (one JSON object per line), keyed by model,
workload, mode, request rate and configuration, so an interrupted sweep resumes where it stopped and
`tune`/`report` can reuse any point. With --repeats N every point is run N times (each run its own
record, `repeat` 0..N-1; serve runs get fresh arrival schedules), so `report` can give each figure an
interval. Records keep per-request latencies, so goodput can be recomputed for any SLO later. Besides
engine arguments, a grid may set `speculative` (off, ngram, draft:MODEL) and `threads` (torch threads the
engine runs on; every record says how many it had) and, in serve mode, `replicas` (that many engines on
Ray Serve behind one endpoint, prefix-aware routing, the threads shared out among them:
tuneserve/deploy/lab.py).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import platform
import sys
import time
from typing import Any

from tqdm import tqdm

from tuneserve.bench.records import append_record, load_records, point_key, torch_threads
from tuneserve.bench.workloads import WORKLOADS, build_workload
from tuneserve.engine_args import EngineArgs, default_device, default_kv_memory

SPECULATIVE = {
    "off": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 4},
}


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """["max_num_seqs=1,2", "quantization=none,int8"] -> {"max_num_seqs": [1, 2], "quantization": [None, "int8"]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        name, _, values = item.partition("=")
        if not values:
            raise ValueError(f"--grid needs NAME=V1,V2,..., got {item!r}")
        name = name.strip().replace("-", "_")
        allowed = {f for f in EngineArgs.__dataclass_fields__} | {"speculative", "threads", "replicas"}
        if name not in allowed:
            raise ValueError(f"unknown grid axis {name!r}; use an engine argument, 'speculative', 'threads' or "
                             "'replicas'")
        grid[name] = [_value(v.strip()) for v in values.split(",")]
    return grid


def _value(v: str) -> Any:
    if v.lower() == "none":
        return None
    try:
        return int(v)
    except ValueError:
        return v


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid, in a stable order."""
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


@functools.cache
def lab_kv_memory(device: str) -> int:
    """The KV cache bytes of every configuration this process measures that sets none: the engine's default,
    resolved once. Resolved per load, it follows the memory free at that moment, so configurations measured
    later (or after a leak) would get a smaller cache and look cheaper for nothing but their turn."""
    return default_kv_memory(device)


def engine_args_for(model: str, point: dict[str, Any], base: dict[str, Any] | None = None,
                    lab_kv: bool = True) -> dict[str, Any]:
    """Engine arguments of a grid point ('speculative' maps to speculative_config; 'threads' is no engine
    argument: the measurement sets torch's thread count); the KV cache is lab_kv_memory unless set (or
    lab_kv is False: a command for the user's own server, which resolves its default there)."""
    args = {**(base or {}), "model": model}
    if lab_kv and "kv_cache_memory_bytes" not in args and "kv_cache_memory_bytes" not in point:
        args["kv_cache_memory_bytes"] = lab_kv_memory(args.get("device") or default_device())
    for name, value in point.items():
        if name in ("threads", "replicas"):
            continue
        if name == "speculative":
            if value not in (None, "off") and value not in SPECULATIVE and not str(value).startswith("draft:"):
                raise ValueError(f"speculative must be off, ngram or draft:MODEL, got {value!r}")
            if isinstance(value, str) and value.startswith("draft:"):
                args["speculative_config"] = {"method": "draft", "model": value[6:], "num_speculative_tokens": 4}
            else:
                args["speculative_config"] = SPECULATIVE.get(value or "off")
        else:
            args[name] = value
    return args


def measure_offline(model: str, point: dict[str, Any], workload: str, num_prompts: int, output_len: int,
                    base: dict[str, Any]) -> dict[str, Any]:
    """Load an engine for the point and run the workload offline."""
    from tuneserve.bench.offline import run_engine, warm_up
    from tuneserve.llm import LLM

    if int(point.get("replicas") or 1) > 1:
        raise ValueError("replicas is a serve-mode axis (replicas sit behind an HTTP endpoint): use --mode serve")
    args = engine_args_for(model, point, base)
    with torch_threads(point.get("threads")):
        t0 = time.perf_counter()
        llm = LLM(**args)
        load_s = time.perf_counter() - t0
        warm_up(llm)
        work = build_workload(llm.get_tokenizer(), workload, num_prompts, output_len)
        res = run_engine(llm, work)
        eng = llm.llm_engine
        res.update(eng.footprint())
        eng.shutdown()  # tensor parallel: the ranks go now, not when the engine is collected
    res.update(load_s=load_s, kv_bytes_per_token=eng.config.model.arch.kv_bytes_per_token,
               spec_acceptance_rate=(eng.stats.spec_num_accepted_tokens / eng.stats.spec_num_draft_tokens
                                     if eng.stats.spec_num_draft_tokens else None))
    return res


def run_sweep(model: str, grid: dict[str, list[Any]], workload: str, out: str, num_prompts: int,
              output_len: int, base: dict[str, Any] | None = None, rates: list[float] | None = None,
              mode: str = "offline", repeats: int = 1) -> list[dict]:
    """Measure every run of every grid point not yet in `out` (`repeats` runs each); returns the records
    written now. In serve mode one server per point runs every rate of the ladder."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    done = {r.get("key") for r in load_records(out)}
    todo: dict[int, list] = {}
    points = grid_points(grid)
    for i, point in enumerate(points):
        for rate in (rates if mode == "serve" else [None]):
            for rep in range(repeats):
                # repeat 0 keeps the key of a single run, so results written before --repeats still count
                key = point_key(model, workload, mode, rate, point, **({"repeat": rep} if rep else {}))
                if key not in done:
                    todo.setdefault(i, []).append((rate, rep, key))
    written = []
    bar = tqdm(total=sum(map(len, todo.values())), desc="sweep", unit="point", disable=not todo)
    for i, pending in todo.items():
        point = points[i]
        if mode == "serve":
            from tuneserve.bench.sweep_serve import run_seed, session_for

            with session_for(model, engine_args_for(model, point, base), point.get("threads"),
                             point.get("replicas")) as session:
                for rate, rep, key in pending:
                    metrics = session.run(workload, num_prompts, output_len, rate, run_seed(rate, rep))
                    written.append(_write(out, key, mode, model, workload, rate, point, num_prompts, output_len,
                                          metrics, rep))
                    bar.update(1)
        else:
            for rate, rep, key in pending:
                metrics = measure_offline(model, point, workload, num_prompts, output_len, base or {})
                written.append(_write(out, key, mode, model, workload, rate, point, num_prompts, output_len,
                                      metrics, rep))
                bar.update(1)
    bar.close()
    return written


def _write(out: str, key: str, mode: str, model: str, workload: str, rate: float | None, point: dict,
           num_prompts: int, output_len: int, metrics: dict, repeat: int = 0) -> dict:
    record = {"key": key, "kind": mode, "system": "tuneserve", "model": model, "workload": workload,
              "mode": mode, "rate": rate, "config": point, "repeat": repeat, "num_prompts": num_prompts,
              "output_len": output_len, "metrics": metrics, "time": time.time(), "machine": platform.node()}
    append_record(out, record)
    return record


def main(ns: argparse.Namespace) -> int:
    grid = parse_grid(ns.grid or ["max_num_seqs=1,4,16,64"])
    base = {f: getattr(ns, f) for f in EngineArgs.__dataclass_fields__
            if f != "model" and getattr(ns, f, None) is not None}
    rates = [float(r) for r in ns.request_rates.split(",")] if ns.request_rates else [float("inf")]
    modes = ["offline", "serve"] if ns.mode == "both" else [ns.mode]
    for mode in modes:
        recs = run_sweep(ns.model, grid, ns.workload, ns.out, ns.num_prompts, ns.output_len, base, rates, mode,
                         ns.repeats)
        print(f"[tuneserve] sweep ({mode}): {len(recs)} new points written to {ns.out}", file=sys.stderr)
    if ns.peers:
        from tuneserve.bench.peers.sweep import sweep_peers

        sweep_peers(ns.model, ns.workload, ns.out, ns.num_prompts, ns.output_len)
    return 0


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("sweep", help="measure the engine over a grid of configurations (resumable JSONL)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--grid", action="append", help="NAME=V1,V2 (engine argument or 'speculative'); repeatable")
    p.add_argument("--workload", default="corpus", choices=WORKLOADS)
    p.add_argument("--mode", default="offline", choices=["offline", "serve", "both"])
    p.add_argument("--request-rates", default="", help="serve mode: requests/s ladder, e.g. 1,2,4,inf")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="runs per point (3 or more give each figure a 95%% "
                   "interval in the report)")
    p.add_argument("--out", default="results/sweep.jsonl")
    p.add_argument("--peers", action="store_true", help="also measure HF transformers and llama.cpp")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(func=main)
