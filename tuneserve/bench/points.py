"""Like-for-like evidence: records grouped into points, and each point judged against the SLOs.

A point is every run of one configuration at one workload (model, prompt set, requests per run, output
length), one mode and one offered rate; its runs are repeats with fresh arrival schedules. Records of
different workloads, modes or rates never share a point, and `tune` compares points of the same workload
and mode only. Each SLO figure of a point is an interval over its runs (bench/stats.py), and its verdict
is 'pass' (the whole interval meets the bound), 'fail' (none of it does) or 'unsure'.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tuneserve.bench.slo import SLO, latency_value, quality_value
from tuneserve.bench.stats import Interval, t_interval, verdict


def config_id(config: dict) -> str:
    """A configuration as a stable string (the identity of a configuration across records)."""
    return json.dumps(config, sort_keys=True, default=str)


def run_count(record: dict) -> int:
    """Requests a run sent (its num_prompts, else what its metrics counted)."""
    m = record.get("metrics", {})
    n = record.get("num_prompts")
    if n is None:
        n = m.get("num_requests", len(m.get("requests") or []))
        n += m.get("failed") or 0
    return int(n)


def like_key(record: dict) -> tuple:
    """What must be equal for two records to be compared: model, workload, mode, rate, requests per run,
    output length (None in older records: unknown, matched by any)."""
    rate = record.get("rate")
    if isinstance(rate, str):
        rate = float(rate)
    return (record.get("model"), record.get("workload"), record.get("mode", record.get("kind")), rate,
            run_count(record), record.get("output_len"))


def runs_label(requests: int, runs: list[dict]) -> str:
    """Requests per run x runs, and how many runs stopped early (their figures are lower bounds)."""
    stopped = sum(bool(r.get("stopped")) for r in runs)
    return f"{requests}x{len(runs)}" + (f" ({stopped} stopped)" if stopped else "")


@dataclass
class Point:
    """Every run of one configuration at one workload, mode and offered rate."""

    config: dict
    rate: float | None
    mode: str
    num_prompts: int
    runs: list[dict] = field(default_factory=list)  # each run's metrics, in repeat order

    @property
    def requests(self) -> int:
        """Requests measured per run (the fewest over the runs)."""
        return min((len(r.get("requests") or []) for r in self.runs), default=0)

    @property
    def failed(self) -> int:
        return sum(r.get("failed") or 0 for r in self.runs)

    def figure(self, fn: Any) -> Interval | None:
        """The interval of fn(run metrics) over the runs where it is defined."""
        return t_interval([v for v in (fn(r) for r in self.runs) if v is not None])

    def cost_value(self, key: str) -> float | None:
        vals = [r[key] for r in self.runs if r.get(key) is not None]
        return max(vals) if vals else None

    @property
    def memory_bytes(self) -> float | None:
        mem = self.cost_value("memory_bytes")
        return mem if mem is not None else self.cost_value("weight_bytes")

    @property
    def threads(self) -> int | None:
        t = self.config.get("threads", self.cost_value("threads"))
        return None if t is None else int(t)

    @property
    def cost(self) -> tuple[float, float]:
        """(memory bytes, threads): lower is cheaper; unknown sorts last."""
        mem, th = self.memory_bytes, self.threads
        return (math.inf if mem is None else float(mem), math.inf if th is None else th)


def collect(records: list[dict], model: str, workload: str, mode: str = "serve", num_prompts: int | None = None,
            output_len: int | None = None, rate: float | None = None) -> dict[str, dict[Any, Point]]:
    """config id -> rate -> Point, over the tuneserve records of one workload and mode (and, when given,
    requests per run, output length and offered rate). An infinite rate (everything at t=0) is an offline
    batch by another name and never a serve point."""
    out: dict[str, dict[Any, Point]] = {}
    for rec in sorted(records, key=lambda r: (r.get("repeat") or 0)):
        mdl, wl, md, r, n, ol = like_key(rec)
        if rec.get("system", "tuneserve") != "tuneserve" or rec.get("kind") == "quality" or "metrics" not in rec:
            continue
        if (mdl, wl, md) != (model, workload, mode) or (num_prompts is not None and n != num_prompts):
            continue
        if output_len is not None and ol is not None and ol != output_len:
            continue
        if mode == "serve" and (r is None or not math.isfinite(r)):
            continue
        if rate is not None and (r is None or not math.isclose(r, rate)):
            continue
        pt = out.setdefault(config_id(rec["config"]), {}).setdefault(r, Point(rec["config"], r, md, n))
        pt.runs.append(rec["metrics"])
    return out


@dataclass
class Judged:
    """A point against the SLOs: each SLO's figure and verdict, the overall verdict, goodput."""

    point: Point
    figures: dict[str, Interval | float | None]
    states: dict[str, str]  # SLO text -> pass | fail | unsure | missing
    state: str  # pass (every SLO surely met) | fail (one surely missed) | unsure
    mean_pass: bool  # every SLO met by the mean (the search steers by it)
    goodput: Interval | None
    worst: tuple[float, SLO | None]  # the largest relative miss by the mean, and its SLO

    @property
    def rate(self) -> float | None:
        return self.point.rate


def _run_goodput(run: dict, limits: dict[str, float]) -> float | None:
    reqs, elapsed = run.get("requests") or [], run.get("elapsed_s")
    if not elapsed:
        return None
    ok = sum(all(r.get(k) is not None and r[k] <= v for k, v in limits.items()) for r in reqs
             if not r.get("partial"))  # a request a stopped run cut off did not finish
    return ok / elapsed


def judge(point: Point, slos: list[SLO], quality: dict[str, dict]) -> Judged:
    """Each SLO's interval (or exact value) at the point, its verdict, and the point's verdict. A run with
    failed requests fails the point: a rate the server drops requests at is not sustained."""
    figures: dict[str, Interval | float | None] = {}
    states: dict[str, str] = {}
    worst: tuple[float, SLO | None] = (0.0, None)
    mean_ok = point.failed == 0
    for s in slos:
        fig: Interval | float | None
        if s.kind == "latency":
            fig = point.figure(lambda r, m=s.metric: latency_value(r.get("requests") or [], m))
        elif s.kind == "throughput":
            fig = point.figure(lambda r: r.get("output_tok_s"))
        elif s.kind == "quality":
            fig = quality_value(point.config.get("quantization"), s.metric, quality)
        else:
            fig = point.memory_bytes if s.metric == "memory_bytes" else point.cost_value("weight_bytes")
        figures[s.metric] = fig
        if fig is None:
            states[str(s)] = "missing"
            mean_ok = False
            worst = max(worst, (math.inf, s), key=lambda t: t[0])
            continue
        mean = fig.mean if isinstance(fig, Interval) else fig
        states[str(s)] = verdict(fig, s.op, s.value) if isinstance(fig, Interval) else (
            "pass" if s.met(fig) else "fail")
        mean_ok = mean_ok and s.met(mean)
        worst = max(worst, (s.excess(mean), s), key=lambda t: t[0])
    if point.failed:
        state = "fail"
    elif any(v == "fail" for v in states.values()):
        state = "fail"
    elif all(v == "pass" for v in states.values()):
        state = "pass"
    else:
        state = "unsure"
    limits: dict[str, float] = {}  # a request is good when it meets every latency bound of its kind
    for s in slos:
        if s.kind == "latency":
            kind = s.latency
            limits[kind] = min(limits.get(kind, math.inf), s.value)
    goodput = point.figure(lambda r: _run_goodput(r, limits))
    return Judged(point, figures, states, state, mean_ok, goodput, worst)
