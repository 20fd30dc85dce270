"""Intervals over repeated runs: a 95% Student-t interval of the mean of per-run figures.

Each run of a point (the same configuration, workload, mode and offered rate, a fresh arrival schedule)
gives one figure, e.g. its TTFT p99; the runs' figures are treated as independent draws and their mean gets
mean +- t(0.975, n-1) * sd / sqrt(n). One run has no interval (-inf, inf): it separates from nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

METHOD = "95% t-interval of the mean over repeated runs"
# t(0.975, df) for df = 1..30, then the larger df this table interpolates in 1/df
_T = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
      2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
_T_LARGE = [(30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960)]


def t975(df: int) -> float:
    """The 97.5th percentile of Student's t with df degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= 30:
        return _T[df - 1]
    for (d0, t0), (d1, t1) in zip(_T_LARGE, _T_LARGE[1:]):
        if df <= d1:
            x0, x1, x = 1 / d0, (0.0 if math.isinf(d1) else 1 / d1), 1 / df
            return t0 + (t1 - t0) * (x0 - x) / (x0 - x1)
    return 1.960


@dataclass(frozen=True)
class Interval:
    """The mean of n runs' figures and its 95% interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def relative_half(self) -> float:
        return self.half / abs(self.mean) if self.mean else math.inf

    def __str__(self) -> str:
        return f"{self.mean:.3g}" + (" (1 run)" if self.n < 2 else f" ±{self.half:.3g}")


def t_interval(values: Sequence[float]) -> Interval | None:
    """The 95% t-interval of the mean of values (None for none; (-inf, inf) for one)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def separated(a: Interval, b: Interval) -> bool:
    """Whether two intervals do not overlap (then, and only then, one figure is called better)."""
    return a.lo > b.hi or b.lo > a.hi


def verdict(iv: Interval, op: str, bound: float) -> str:
    """'pass' when the whole interval meets the bound, 'fail' when none of it does, else 'unsure'."""
    if op == "<=":
        return "pass" if iv.hi <= bound else "fail" if iv.lo > bound else "unsure"
    return "pass" if iv.lo >= bound else "fail" if iv.hi < bound else "unsure"
