"""`tuneserve tune`: pick the configuration with the highest goodput that meets every SLO.

SLOs are `metric<=value` or `metric>=value`, comma-separated, with units s, ms or %:
  ttft_p99<=1s, tpot_p50<=80ms, e2el_p90<=20s  latency percentiles over the requests of a measurement
  ppl_increase<=2%                              perplexity increase against the unquantized model
  kl<=0.05, top1>=95%                           KL divergence / top-1 agreement against unquantized
  output_tok_s>=100, weight_bytes<=2e8          throughput floor, memory ceiling
Goodput = requests that met every latency SLO, per second of the measurement. Results come from a sweep
file; missing points of the search space are measured within `--budget-minutes`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuneserve.bench.records import load_records, table
from tuneserve.bench.sweep import engine_args_for, grid_points, run_sweep
from tuneserve.bench.sweep_quality import ensure_quality

_SLO = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=)\s*([0-9.eE+-]+)\s*(ms|s|%)?\s*$")
DEFAULT_SPACE = {"max_num_seqs": [1, 4, 16, 64], "quantization": [None, "int8", "int4"],
                 "speculative": ["off", "ngram"]}
LATENCY = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class SLO:
    metric: str
    op: str  # "<=" | ">="
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_slos(text: str) -> list[SLO]:
    """'ttft_p99<=1s,tpot_p99<=80ms,ppl_increase<=2%' -> SLOs in seconds / fractions."""
    out = []
    for part in text.split(","):
        m = _SLO.match(part)
        if not m:
            raise ValueError(f"cannot read SLO {part!r}: write metric<=value or metric>=value, e.g. tpot_p99<=80ms")
        metric, op, value, unit = m.groups()
        v = float(value) * {"ms": 1e-3, "%": 1e-2}.get(unit or "", 1.0)
        out.append(SLO(metric, op, v))
    return out


def _latency_threshold(slos: list[SLO], kind: str) -> float | None:
    vals = [s.value for s in slos if s.metric.startswith(kind) and s.op == "<="]
    return min(vals) if vals else None


def metric_value(record: dict, metric: str, quality: dict[str, dict]) -> float | None:
    """A record's value of an SLO metric (None when not measured)."""
    m = record["metrics"]
    kind, _, pct = metric.partition("_p")
    if kind in LATENCY and pct.isdigit():
        vals = [r[kind] for r in m.get("requests", []) if r.get(kind) is not None]
        return float(np.percentile(vals, int(pct))) if vals else m.get(f"{kind}_p{pct}_s")
    if metric.endswith("_mean") and metric[:-5] in LATENCY:
        vals = [r[metric[:-5]] for r in m.get("requests", []) if r.get(metric[:-5]) is not None]
        return float(np.mean(vals)) if vals else None
    q = quality.get(str(record["config"].get("quantization")))
    base = quality.get("None")
    if metric == "ppl_increase":
        return None if q is None or base is None else q["perplexity"] / base["perplexity"] - 1
    if metric in ("kl", "top1"):
        if record["config"].get("quantization") is None:
            return 0.0 if metric == "kl" else 1.0
        return None if q is None else q["kl_divergence" if metric == "kl" else "top1_agreement"]
    return m.get(metric)


def goodput(record: dict, slos: list[SLO]) -> float:
    """Requests meeting every latency threshold, per second."""
    m = record["metrics"]
    reqs = m.get("requests") or []
    limits = {k: _latency_threshold(slos, k) for k in LATENCY}
    ok = sum(all(limits[k] is None or (r.get(k) is not None and r[k] <= limits[k]) for k in LATENCY) for r in reqs)
    return ok / m["elapsed_s"] if m.get("elapsed_s") else 0.0


def evaluate(records: list[dict], slos: list[SLO], quality: dict[str, dict]) -> list[dict]:
    """One evidence row per measured configuration: goodput, SLO values, pass/fail, worst excess."""
    rows = []
    for rec in records:
        row: dict[str, Any] = {"config": rec["config"], "rate": rec.get("rate"), "record": rec,
                               "goodput": goodput(rec, slos), "output_tok_s": rec["metrics"].get("output_tok_s")}
        excess = []
        for s in slos:
            v = metric_value(rec, s.metric, quality)
            row[str(s.metric)] = v
            if v is None:
                excess.append((float("inf"), s))
                continue
            ratio = v / s.value if s.op == "<=" else (s.value / v if v > 0 else float("inf"))
            if s.value == 0:
                ratio = 1.0 if (v <= 0 if s.op == "<=" else True) else float("inf")
            excess.append((max(0.0, ratio - 1), s))
        row["feasible"] = all(e == 0 for e, _ in excess)
        row["worst"] = max(excess, key=lambda t: t[0]) if excess else (0.0, None)
        rows.append(row)
    return rows


def choose(rows: list[dict]) -> tuple[dict | None, dict | None, SLO | None]:
    """(best feasible row, closest infeasible row, its binding SLO)."""
    feasible = [r for r in rows if r["feasible"]]
    if feasible:
        return max(feasible, key=lambda r: (r["goodput"], r["output_tok_s"] or 0)), None, None
    if not rows:
        return None, None, None
    closest = min(rows, key=lambda r: r["worst"][0])
    return None, closest, closest["worst"][1]


def serve_command(model: str, config: dict) -> str:
    """A ready-to-run `tuneserve serve` command for a configuration."""
    args = engine_args_for(model, config)
    parts = ["tuneserve", "serve", model]
    for k, v in args.items():
        if k == "model" or v is None:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def quality_index(records: list[dict], model: str) -> dict[str, dict]:
    """quantization (as str) -> quality metrics, from 'quality' records of the model."""
    return {str(r["config"].get("quantization")): r["metrics"] for r in records
            if r.get("kind") == "quality" and r.get("model") == model}


def main(ns: argparse.Namespace) -> int:
    slos = parse_slos(ns.slo)
    space = json.loads(ns.space) if ns.space else DEFAULT_SPACE
    deadline = time.monotonic() + ns.budget_minutes * 60
    if ns.budget_minutes > 0:
        _measure_missing(ns, space, slos, deadline)
    records = [r for r in load_records(ns.results) if r.get("system", "tuneserve") == "tuneserve"
               and r.get("model") == ns.model and r.get("workload") == ns.workload and r.get("kind") != "quality"]
    rows = evaluate(records, slos, quality_index(load_records(ns.results), ns.model))
    best, closest, binding = choose(rows)
    cols = ["config", "rate", "goodput", "output_tok_s"] + [s.metric for s in slos] + ["feasible"]
    shown = [{**r, "config": json.dumps(r["config"], default=str)} for r in sorted(rows, key=lambda r: -r["goodput"])]
    print(table(shown, cols, title=f"tune: {ns.model}, workload {ns.workload}, SLOs {', '.join(map(str, slos))}"))
    if best is not None:
        print(f"\nchosen: {json.dumps(best['config'], default=str)} with goodput {best['goodput']:.2f} req/s")
        print("run it with:\n  " + serve_command(ns.model, best["config"]))
        return 0
    if closest is None:
        print("no measurements to choose from: run `tuneserve sweep` or give --budget-minutes", file=sys.stderr)
        return 1
    v = closest.get(binding.metric)
    print(f"\nno configuration meets every SLO. Binding SLO: {binding} (closest configuration "
          f"{json.dumps(closest['config'], default=str)} has {binding.metric}={v if v is None else f'{v:.4g}'})")
    return 1


def _measure_missing(ns: argparse.Namespace, space: dict, slos: list[SLO], deadline: float) -> None:
    """Measure points of the search space that the results file lacks, until the budget is spent."""
    for point in grid_points(space):
        if time.monotonic() > deadline:
            print("[tuneserve] tune: budget spent; choosing among what is measured", file=sys.stderr)
            return
        run_sweep(ns.model, {k: [v] for k, v in point.items()}, ns.workload, ns.results, ns.num_prompts,
                  ns.output_len)
        if any(s.metric in ("ppl_increase", "kl", "top1") for s in slos):
            ensure_quality(ns.model, point.get("quantization"), ns.results)


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("tune", help="pick the configuration that meets your SLOs with the highest goodput")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--slo", required=True, help='e.g. "ttft_p99<=1s,tpot_p99<=80ms,ppl_increase<=2%%"')
    p.add_argument("--workload", default="corpus")
    p.add_argument("--results", default="results/sweep.jsonl")
    p.add_argument("--budget-minutes", type=float, default=0.0, help="time to measure missing points")
    p.add_argument("--space", default=None, help="search space as JSON {axis: [values]} (default: a small grid)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.set_defaults(func=main)
