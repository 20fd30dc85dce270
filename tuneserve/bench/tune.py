"""`tuneserve tune`: the configuration that meets every SLO at the highest sustained rate, or the cheapest one
that meets them at a rate you give (--rate), with the evidence.

Latency SLOs are judged on requests that arrive at an offered rate (serve mode, Poisson arrivals, the
server in this process), never on an offline batch; configurations are compared at the same workload,
mode and offered rate only (bench/points.py). Each point is run --repeats times (more while its verdict is
unsure); each figure is the mean over the runs with a 95% t-interval (bench/stats.py), and a configuration
is called better only when intervals separate, otherwise it is a tie and the cheaper one (less memory,
then fewer threads) is chosen (bench/rank.py). With --budget-minutes, tune runs its own search (coarse,
then refined at the frontier; bench/tune_space.py, bench/tune_search.py), resumable from --results. SLO
grammar: bench/slo.py.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys

from tuneserve.bench.points import Judged, config_id, runs_label
from tuneserve.bench.rank import Capacity, Decision
from tuneserve.bench.records import fmt, table
from tuneserve.bench.slo import SLO, parse_slos, thin_tails
from tuneserve.bench.stats import METHOD, Interval
from tuneserve.bench.sweep import engine_args_for
from tuneserve.bench.tune_search import Settings, Tuner
from tuneserve.bench.tune_space import default_space, parse_space
from tuneserve.bench.workloads import WORKLOADS

MIN_REQUESTS = 200  # per run: p99 then has two requests beyond it


def serve_command(model: str, config: dict) -> str:
    """A ready-to-run `tuneserve serve` command for a configuration (threads as OMP_NUM_THREADS)."""
    args = engine_args_for(model, config, lab_kv=False)
    parts = [f"OMP_NUM_THREADS={int(config['threads'])}"] if config.get("threads") is not None else []
    parts += ["tuneserve", "serve", model]
    for k, v in args.items():
        if k == "model" or v is None:
            continue
        parts += ["--" + k.replace("_", "-"), json.dumps(v) if isinstance(v, dict) else str(v)]
    return " ".join(shlex.quote(p) for p in parts)


def settings_from(ns: argparse.Namespace) -> Settings:
    """Settings from the flags, or ValueError saying which flag is wrong."""
    slos = parse_slos(ns.slo)
    checks = [(ns.num_prompts >= 1, "--num-prompts must be >= 1"),
              (ns.output_len >= 1, "--output-len must be >= 1"),
              (ns.repeats >= 2, "--repeats must be >= 2 (an interval needs two runs)"),
              (ns.max_repeats >= ns.repeats, "--max-repeats must be >= --repeats"),
              (ns.rate is None or (ns.rate > 0 and math.isfinite(ns.rate)),
               "--rate must be a finite number of requests/s > 0 (an infinite rate is an offline batch)"),
              (0 < ns.min_rate <= ns.start_rate <= ns.max_rate < math.inf,
               "need 0 < --min-rate <= --start-rate <= --max-rate (finite)"),
              (ns.budget_minutes >= 0, "--budget-minutes must be >= 0")]
    for ok, why in checks:
        if not ok:
            raise ValueError(why)
    return Settings(ns.model, ns.workload, ns.results, slos, ns.num_prompts, ns.output_len, ns.repeats,
                    ns.max_repeats, ns.rate, ns.start_rate, ns.min_rate, ns.max_rate, not ns.no_early_stop)


def _fig(v: Interval | float | None) -> str:
    if isinstance(v, Interval):
        return str(v)
    return fmt(v)


def _runs(j: Judged | None) -> str:
    return "-" if j is None else runs_label(j.point.requests, j.point.runs)


def _cost(row: dict, cost: tuple[float, float]) -> dict:
    row["memory_MiB"] = None if math.isinf(cost[0]) else cost[0] / 2**20
    row["threads"] = None if math.isinf(cost[1]) else int(cost[1])
    return row


def _verdict(e: Capacity | Judged, cid: str, chosen: str | None, ties: set[str]) -> str:
    if cid == chosen:
        return "chosen"
    if cid in ties:
        return "tie"
    if isinstance(e, Judged):
        return e.state  # pass (but dearer), fail or unsure
    if e.sure <= 0:
        return "never surely met"
    return "worse" if chosen else "-"


def evidence_rows(decision: Decision, evidence: list, slos: list[SLO], rate: float | None,
                  skipped: dict[str, str]) -> tuple[list[dict], list[str]]:
    """The evidence table: one row per configuration, its figures at `rate` (like for like)."""
    chosen = config_id(_cfg(decision.chosen)) if decision.chosen is not None else None
    ties = {config_id(_cfg(t)) for t in decision.ties}
    rows = []
    for e in evidence:
        cid = config_id(_cfg(e))
        if isinstance(e, Capacity):
            at = next((j for r, j in e.points.items() if rate is not None and math.isclose(r, rate)), None)
            row = {"config": cid, "sustained": e.sure or None, "fails_at": None if math.isinf(e.upper) else e.upper,
                   "estimate": e.estimate or None}
        else:
            at = e
            row = {"config": cid, "rate": e.rate}
        _cost(row, at.point.cost if at else e.cost)
        row["runs"] = _runs(at)
        for s in slos:
            row[s.metric] = _fig(at.figures.get(s.metric)) if at else "-"
        row["goodput"] = _fig(at.goodput) if at else "-"
        row["verdict"] = _verdict(e, cid, chosen, ties)
        row["_key"] = ((-e.sure, -e.estimate) if isinstance(e, Capacity) else ()) + (row["memory_MiB"] or 0, cid)
        rows.append(row)
    rows.sort(key=lambda r: r.pop("_key"))
    rows += [{"config": cid, "verdict": "skipped: " + why} for cid, why in skipped.items()]
    cols = [c for c in (rows[0] if rows else {"config": 0}) if c != "verdict"]
    return rows, cols + ["verdict"]


def _fixed_axes(configs: list[dict]) -> dict:
    """The axes with one value in every configuration (when there are two configurations or more)."""
    if len(configs) < 2:
        return {}
    first = configs[0]
    return {k: v for k, v in first.items() if all(k in c and c[k] == v for c in configs)}


def _cfg(x: Capacity | Judged) -> dict:
    return x.config if isinstance(x, Capacity) else x.point.config


def report(tuner: Tuner, out=None) -> int:  # noqa: ANN001
    """Print the evidence and the answer (to stdout by default); 0 when a configuration was chosen."""
    out = out or sys.stdout
    s = tuner.s
    decision, evidence = tuner.decide()
    rate = s.rate if s.rate is not None else (decision.rate if decision.chosen else
                                              (decision.closest.rate if decision.closest else None))
    for w in thin_tails(s.slos, s.num_prompts):
        print(f"warning: {w} (--num-prompts)", file=out)
    mode = f"at {s.rate:g} req/s" if s.rate is not None else "highest sustained rate"
    title = (f"tune ({mode}): {s.model}, workload {s.workload}, {s.num_prompts} requests per run, {s.output_len} "
             f"tokens out, serve mode (Poisson arrivals); SLOs {', '.join(map(str, s.slos))}\n"
             f"figures at {fmt(rate)} req/s: mean ±half-width, {METHOD}; runs: requests x runs")
    rows, cols = evidence_rows(decision, evidence, s.slos, rate, tuner.skipped)
    fixed = _fixed_axes([_cfg(e) for e in evidence])
    if fixed:  # axes every configuration shares go in the title, not in every row
        title += f"; every configuration has {json.dumps(fixed, default=str)}"
        for r in rows:
            r["config"] = json.dumps({k: v for k, v in json.loads(r["config"]).items() if k not in fixed})
    print(table(rows, cols, title=title) if rows else title + "\n(no serve measurements of this workload)", file=out)
    if decision.chosen is None:
        c = decision.closest
        if c is None:
            print("\nno serve measurements to choose from: give --budget-minutes to measure", file=out)
            return 1
        where = f"Closest: {config_id(c.point.config)} at {c.rate:g} req/s"
        slo = c.worst[1]
        if c.point.failed:
            why = f"{c.point.failed} requests failed"
        elif slo is not None and c.worst[0] > 0:
            why = f"binding SLO {slo} (measured {_fig(c.figures.get(slo.metric))})"
        else:
            open_ = [k for k, v in c.states.items() if v != "pass"]
            why = (f"every SLO is met by the means, not surely: {', '.join(open_)} (intervals straddle the bound; "
                   f"more runs narrow them: --repeats, --max-repeats)")
        print(f"\nno configuration surely meets every SLO. {where}: {why}", file=out)
        return 1
    ch = decision.chosen
    if isinstance(ch, Capacity):
        top = max(ch.points)
        upper = (f"no measured rate made it surely fail (up to {top:g} req/s)" if math.isinf(ch.upper) else
                 f"it surely fails at {ch.upper:g} req/s")
        print(f"\nchosen: {ch.id}: meets every SLO at {ch.sure:g} req/s (95%); {upper}", file=out)
    else:
        print(f"\nchosen: {config_id(ch.point.config)}: the cheapest that meets every SLO at {ch.rate:g} req/s "
              f"(95%), goodput {_fig(ch.goodput)} req/s", file=out)
    for t in decision.ties:
        if isinstance(t, Capacity):
            what = (f"capacity brackets overlap: [{ch.sure:g}, {ch.upper:g}) vs [{t.sure:g}, {t.upper:g}): "
                    "chose the cheaper (memory, then threads)")
        else:
            what = ("the same cost, goodput intervals overlap: chose the one measured first (a search measures "
                    "the engine's defaults first)")
        print(f"tie with {config_id(_cfg(t))} ({what})", file=out)
    print("run it with:\n  " + serve_command(s.model, _cfg(ch)), file=out)
    if tuner.spent:
        print("(the budget ran out before the search did: run again with the same --results to go on)", file=out)
    return 0


def main(ns: argparse.Namespace) -> int:
    s = settings_from(ns)
    tuner = Tuner(s, ns.budget_minutes * 60, progress=not ns.no_progress)
    if ns.budget_minutes > 0:
        for w in thin_tails(s.slos, s.num_prompts):
            print(f"[tuneserve] warning: {w}", file=sys.stderr)
        point_s = s.min_repeats * s.num_prompts / (s.rate or s.start_rate)
        if point_s > ns.budget_minutes * 60:
            print(f"[tuneserve] warning: one point takes about {point_s:.0f}s ({s.min_repeats} runs x "
                  f"{s.num_prompts} requests at {s.rate or s.start_rate:g} req/s), more than the budget: raise "
                  f"--budget-minutes (a tune resumes from --results)", file=sys.stderr)
        tuner.search(parse_space(ns.space) if ns.space else default_space(s.model))
    return report(tuner)


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("tune", help="the configuration that meets your SLOs at the highest sustained rate "
                                    "(or the cheapest at --rate)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--slo", required=True, help='e.g. "ttft_p99<=2s,tpot_p99<=100ms,ppl_increase<=2%%"')
    p.add_argument("--rate", type=float, default=None,
                   help="offered requests/s: choose the cheapest configuration meeting every SLO there")
    p.add_argument("--workload", default="corpus", choices=WORKLOADS)
    p.add_argument("--results", default="results/sweep.jsonl", help="results file (read, appended, resumable)")
    p.add_argument("--budget-minutes", type=float, default=0.0, help="time to measure; 0: decide from --results")
    p.add_argument("--space", default=None, help="search space as JSON {axis: [values]}, base values first "
                   "(default: quantization, speculative, max_num_seqs, max_num_batched_tokens, threads, "
                   "tensor_parallel_size)")
    p.add_argument("--num-prompts", type=int, default=MIN_REQUESTS,
                   help=f"requests per run (below {MIN_REQUESTS} a p99 is nearly the maximum: warned)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per point (more while a verdict is unsure)")
    p.add_argument("--max-repeats", type=int, default=6)
    p.add_argument("--start-rate", type=float, default=1.0, help="first offered rate of the capacity search")
    p.add_argument("--min-rate", type=float, default=0.5, help="lowest offered rate tried (a run at rate r "
                   "takes num_prompts / r seconds)")
    p.add_argument("--max-rate", type=float, default=64.0, help="highest offered rate tried")
    p.add_argument("--no-early-stop", action="store_true", help="run every request of every run, even once a run "
                   "surely misses a latency SLO (by default it stops there: bench/early_stop.py)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)
