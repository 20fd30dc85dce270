"""`tune`'s measurements: offered rates and repeats for each configuration, within a time budget.

Offered rates lie on one grid, start_rate * 2^(k/4), so that every configuration is measured at the same
rates and points compare like for like. For the highest sustained rate, a configuration's first probe is
the best configuration's sure rate so far (one that surely fails there is surely worse, and one that fails
there by the means without being cheaper cannot win a tie: both are done), else start_rate; then the rate
doubles while the SLOs hold by the means, halves while they fail, and is bisected to one grid step; one more
step either side checks an unsure end of the bracket. A run stops as soon as it surely misses a latency
SLO (bench/early_stop.py), so rates above the capacity cost little. At a given rate, a configuration that
loads costlier (memory, then threads) than one already surely meeting every SLO there is skipped. Every
point gets min_repeats runs, and more, up to max_repeats, while its verdict is unsure. Every run is appended
to the results file when it ends, so a resumed tune retraces its path from the records and measures only
what is missing.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from tuneserve.bench.early_stop import stopper
from tuneserve.bench.points import Judged, collect, config_id, judge
from tuneserve.bench.rank import Capacity, Decision, capacity, decide_at_rate, decide_capacity
from tuneserve.bench.records import append_record, load_records, point_key
from tuneserve.bench.slo import SLO, quality_index
from tuneserve.bench.tune_space import coarse, refine


@dataclass
class Settings:
    """What one tune measures and decides on."""

    model: str
    workload: str
    results: str
    slos: list[SLO]
    num_prompts: int = 200
    output_len: int = 64
    min_repeats: int = 3
    max_repeats: int = 6
    rate: float | None = None  # a given offered rate: the cheapest configuration there
    start_rate: float = 1.0
    min_rate: float = 0.5
    max_rate: float = 64.0
    early_stop: bool = True  # stop a run once it surely misses a latency SLO (bench/early_stop.py)


def grid_rate(start: float, k: int) -> float:
    return float(f"{start * 2 ** (k / 4):.6g}")


def grid_index(start: float, rate: float) -> int:
    return round(4 * math.log2(rate / start))


def next_rate(points: dict[float, Judged], s: Settings, first: float | None = None) -> float | None:
    """The next offered rate to measure for one configuration (None: its capacity is bracketed)."""
    kmin = math.ceil(4 * math.log2(s.min_rate / s.start_rate) - 1e-9)
    kmax = math.floor(4 * math.log2(s.max_rate / s.start_rate) + 1e-9)
    ks = {grid_index(s.start_rate, r): j for r, j in points.items()}
    if not ks:
        return first if first is not None else grid_rate(s.start_rate, min(max(0, kmin), kmax))
    fail_k = min((k for k, j in ks.items() if not j.mean_pass), default=None)
    pass_k = max((k for k, j in ks.items() if j.mean_pass and (fail_k is None or k < fail_k)), default=None)
    k = None
    if fail_k is None:
        k = min(pass_k + 4, kmax) if pass_k < kmax else None
    elif pass_k is None:
        k = max(fail_k - 4, kmin) if fail_k > kmin else None
    elif fail_k - pass_k > 1:
        k = (pass_k + fail_k) // 2
    if k is not None and k not in ks:
        return grid_rate(s.start_rate, k)
    if pass_k is not None and ks[pass_k].state != "pass" and pass_k - 1 >= kmin and pass_k - 1 not in ks:
        return grid_rate(s.start_rate, pass_k - 1)
    if fail_k is not None and ks[fail_k].state != "fail" and fail_k + 1 <= kmax and fail_k + 1 not in ks:
        return grid_rate(s.start_rate, fail_k + 1)
    return None


class BudgetSpent(Exception):
    """The next run would end after the deadline."""


def serve_session(model: str, config: dict) -> Any:
    """The default session factory: the configuration behind an in-process HTTP server (or its replicas)."""
    from tuneserve.bench.sweep import engine_args_for
    from tuneserve.bench.sweep_serve import session_for

    return session_for(model, engine_args_for(model, config), config.get("threads"), config.get("replicas"))


class Tuner:
    """Measures configurations (each in one session) and decides among what the results file holds."""

    def __init__(self, s: Settings, budget_s: float = 0.0, session: Callable[[str, dict], Any] = serve_session,
                 progress: bool = True) -> None:
        self.s, self.budget_s, self.session = s, budget_s, session
        self.t0 = time.monotonic()
        self.progress = progress
        self.skipped: dict[str, str] = {}  # config id -> why it was not measured
        self.searched: list[dict] = []
        self.runs = 0
        self.spent = False
        self._recs: list[dict] | None = None

    # ----- evidence -------------------------------------------------------------------------------
    def _records(self) -> list[dict]:
        """The results file's records (read once; this tuner's own runs are added as they are written)."""
        if self._recs is None:
            self._recs = load_records(self.s.results)
        return self._recs

    def judged(self, configs: list[dict] | None = None) -> dict[str, list[Judged]]:
        """config id -> its judged points (at the given rate only, with --rate)."""
        recs = self._records()
        quality = quality_index(recs, self.s.model)
        pts = collect(recs, self.s.model, self.s.workload, "serve", self.s.num_prompts, self.s.output_len,
                      self.s.rate)
        wanted = None if configs is None else {config_id(c) for c in configs}
        return {cid: [judge(p, self.s.slos, quality) for p in by_rate.values()] for cid, by_rate in pts.items()
                if wanted is None or cid in wanted}

    def decide(self, configs: list[dict] | None = None) -> tuple[Decision, list[Capacity | Judged]]:
        """The decision among (the given) measured configurations, and the evidence behind it."""
        judged = self.judged(configs)
        if self.s.rate is not None:
            rows = [j[0] for j in judged.values() if j]
            return decide_at_rate(rows), rows
        caps = [capacity(js[0].point.config, js) for js in judged.values() if js]
        return decide_capacity(caps), caps

    def chosen_and_ties(self, configs: list[dict]) -> list[dict]:
        d, _ = self.decide(configs)
        if d.chosen is None:
            return []
        return [_config(d.chosen)] + [_config(t) for t in d.ties]

    # ----- measurement ----------------------------------------------------------------------------
    def search(self, space: dict[str, list[Any]]) -> None:
        """Coarse pass, then refinement, until nothing new is left or the budget is spent."""
        from tqdm import tqdm

        plan, done = coarse(space), set()
        self.bar = tqdm(total=max(1, round(self.budget_s)), unit="s", desc="tune", disable=not self.progress,
                        file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of the budget"
                                                    "{postfix}")
        try:
            while plan:
                cfg = plan.pop(0)
                if config_id(cfg) in done:
                    continue
                done.add(config_id(cfg))
                self.searched.append(cfg)
                self._tick(cfg, len(plan))
                self.evaluate(cfg)
                if not plan:
                    plan = refine(space, self.searched, self.chosen_and_ties)
        except BudgetSpent:
            self.spent = True
        finally:
            self._tick(None, 0)
            self.bar.close()
        if self.spent:
            print(f"[tuneserve] tune: budget spent after {len(self.searched)} configurations; choosing among what "
                  f"is measured (run again with the same --results to go on)", file=sys.stderr)

    def _tick(self, cfg: dict | None, planned: int) -> None:
        """Progress: the budget spent, and the time the planned configurations should take (the mean time
        of those done so far each; before any is done, a guess of five points at the start rate each)."""
        elapsed = time.monotonic() - self.t0
        self.bar.n = min(elapsed, self.bar.total)
        done = len(self.searched) - (cfg is not None)
        s = self.s
        guess = (1 if s.rate else 5) * s.min_repeats * s.num_prompts / (s.rate or s.start_rate)
        per_config = elapsed / done if done > 0 else guess
        left = min(max(0.0, self.budget_s - elapsed), per_config * (planned + (cfg is not None)))
        note = f"{len(self.searched)} configurations, about {left:.0f}s left"
        self.bar.set_postfix_str(note + (f"; now {config_id(cfg)}" if cfg else ""))
        self.bar.refresh()

    def evaluate(self, config: dict) -> None:
        """Measure what the decision about one configuration needs (within the budget)."""
        if not self._quality_ok(config):
            return
        with ExitStack() as stack:
            opened: list[Any] = []

            def session() -> Any:
                if not opened:
                    self._check_budget(0.0)
                    opened.append(stack.enter_context(self.session(self.s.model, config)))
                return opened[0]

            if self.s.rate is not None:
                if not self._costlier_than_a_sure_pass(config, session()):
                    self._point(config, self.s.rate, session)
                return
            best, _ = self.decide([c for c in self.searched if config_id(c) != config_id(config)])
            first = best.chosen.sure if best.chosen is not None else None
            points: dict[float, Judged] = {}
            while (rate := next_rate(points, self.s, first)) is not None:
                j = self._point(config, rate, session)
                points[rate] = j
                if first is not None and rate == first and (j.state == "fail" or (
                        not j.mean_pass and j.point.cost >= best.chosen.cost)):
                    return  # surely worse than the best so far, or at most a tie it would lose on cost

    def _costlier_than_a_sure_pass(self, config: dict, session: Any) -> bool:
        """At a given rate the cheapest sure pass wins, so a configuration that costs more (memory, then
        threads: what its loaded session holds) than one already surely meeting every SLO there cannot be
        chosen; it is skipped, unmeasured. One that already has runs at the rate is measured on, as before."""
        cost = getattr(session, "cost", None) or {}
        if cost.get("memory_bytes") is None or config_id(config) in self.judged([config]):
            return False
        mine = (float(cost["memory_bytes"]), config.get("threads", cost.get("threads", math.inf)))
        best, _ = self.decide([c for c in self.searched if config_id(c) != config_id(config)])
        if best.chosen is None or not best.chosen.point.cost < mine:
            return False
        self.skipped[config_id(config)] = (f"costs more ({mine[0] / 2**20:,.0f} MiB, {mine[1]} threads) than "
                                           f"{config_id(best.chosen.point.config)}, which surely meets every SLO")
        return True

    def _point(self, config: dict, rate: float, session: Callable[[], Any]) -> Judged:
        """The point of config at rate, with the runs it still needs measured first."""
        last = -1
        while True:
            js = self.judged([config])
            have = [j for j in js.get(config_id(config), []) if math.isclose(j.rate, rate)]
            runs = len(have[0].point.runs) if have else 0
            if runs >= self.s.max_repeats or (runs >= self.s.min_repeats and have[0].state != "unsure"):
                return have[0]
            if runs == last:
                raise RuntimeError(f"a run of {config_id(config)} at {rate:g} req/s left no record of this workload")
            last = runs
            self._check_budget(self.s.num_prompts / rate)
            self._run(session(), config, rate, runs)

    def _run(self, session: Any, config: dict, rate: float, repeat: int) -> None:
        from tuneserve.bench.sweep_serve import run_seed

        s = self.s
        metrics = session.run(s.workload, s.num_prompts, s.output_len, rate, run_seed(rate, repeat),
                              stop=stopper(s.slos) if s.early_stop else None)
        key = point_key(s.model, s.workload, "serve", rate, config, repeat=repeat, num_prompts=s.num_prompts,
                        output_len=s.output_len)
        rec = {"key": key, "kind": "serve", "system": "tuneserve", "model": s.model, "workload": s.workload,
               "mode": "serve", "rate": rate, "config": config, "repeat": repeat, "num_prompts": s.num_prompts,
               "output_len": s.output_len, "metrics": metrics, "time": time.time(), "machine": platform.node()}
        append_record(s.results, rec)
        self._records().append(rec)
        self.runs += 1
        self._tick(config, 0)

    def _check_budget(self, seconds: float) -> None:
        if time.monotonic() + seconds > self.t0 + self.budget_s:
            raise BudgetSpent

    def _quality_ok(self, config: dict) -> bool:
        """Measure the quality a quality SLO needs; False (and skipped) when it surely fails one."""
        from tuneserve.bench.slo import quality_value
        from tuneserve.bench.sweep_quality import ensure_quality

        qs = [s for s in self.s.slos if s.kind == "quality"]
        if not qs:
            return True
        quant = config.get("quantization")
        if quant not in (None, "none"):
            self._check_budget(0.0)
            ensure_quality(self.s.model, quant, self.s.results)
            self._recs = None  # re-read: the quality records may be new
        quality = quality_index(self._records(), self.s.model)
        missed = [str(s) for s in qs if (v := quality_value(quant, s.metric, quality)) is not None and not s.met(v)]
        if missed:
            self.skipped[config_id(config)] = "misses " + ", ".join(missed)
        return not missed


def _config(x: Capacity | Judged) -> dict:
    return x.config if isinstance(x, Capacity) else x.point.config
