"""Which configuration wins, and when it is a tie.

Highest sustained rate: a configuration's capacity is bracketed by its judged points (bench/points.py):
  sure      the highest offered rate at which every SLO surely holds (0: none),
  upper     the lowest offered rate at which some SLO surely fails (inf: none measured),
  estimate  the highest rate that passes by the means, below the lowest that fails by the means.
The top configuration has the highest `sure` (then estimate). Another is better or worse only when the
brackets separate (its `upper` <= the top's `sure`: at a rate the top surely sustains, it surely fails);
otherwise they tie, and the cheaper (less memory, then fewer threads) is chosen, at its own sure rate.

At a given rate: the cheapest configuration that surely meets every SLO there; of equal cost, the one with
the higher goodput when the goodput intervals separate, else a tie, and the one measured first is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tuneserve.bench.points import Judged, config_id
from tuneserve.bench.stats import separated


@dataclass
class Capacity:
    """A configuration's capacity bracket from its points at several offered rates."""

    config: dict
    points: dict[float, Judged]
    sure: float
    upper: float
    estimate: float
    cost: tuple[float, float]

    @property
    def id(self) -> str:
        return config_id(self.config)


def capacity(config: dict, judged: list[Judged]) -> Capacity:
    """The bracket [sure, upper] and the estimate of one configuration's sustained rate."""
    by_rate = {j.rate: j for j in judged if j.rate is not None}
    upper = min((r for r, j in by_rate.items() if j.state == "fail"), default=math.inf)
    sure = max((r for r, j in by_rate.items() if j.state == "pass" and r < upper), default=0.0)
    mean_fail = min((r for r, j in by_rate.items() if not j.mean_pass), default=math.inf)
    estimate = max((r for r, j in by_rate.items() if j.mean_pass and r < mean_fail), default=0.0)
    costs = sorted(j.point.cost for j in judged)
    return Capacity(config, dict(sorted(by_rate.items())), sure, upper, estimate,
                    costs[0] if costs else (math.inf, math.inf))


def overlaps(a: Capacity, b: Capacity) -> bool:
    """Whether two capacity brackets overlap (neither is surely above the other)."""
    return a.upper > b.sure and b.upper > a.sure


@dataclass
class Decision:
    """What `tune` answers: the chosen configuration (None: nothing surely meets every SLO), the
    configurations it cannot be told apart from, and, without a choice, the closest one."""

    chosen: Capacity | Judged | None
    rate: float | None = None
    top: Capacity | Judged | None = None  # the best by the figure (the chosen one unless a tie went cheaper)
    ties: list = field(default_factory=list)
    closest: Judged | None = None

    @property
    def tie(self) -> bool:
        return bool(self.ties)


def _closest(judged: list[Judged]) -> Judged | None:
    """The point that misses its SLOs by the least (by the means), lowest rate first."""
    return min(judged, key=lambda j: (j.worst[0], j.rate or 0.0, config_id(j.point.config)), default=None)


def decide_capacity(caps: list[Capacity]) -> Decision:
    """The configuration that surely sustains the highest rate, or the cheaper of those it ties with."""
    eligible = [c for c in caps if c.sure > 0]
    if not eligible:
        lowest = [c.points[min(c.points)] for c in caps if c.points]
        return Decision(None, closest=_closest(lowest))
    top = max(eligible, key=lambda c: (c.sure, c.estimate, [-x for x in c.cost], _neg(c.id)))
    ties = [c for c in eligible if c is not top and overlaps(c, top)]
    chosen = min([top, *ties], key=lambda c: (c.cost, -c.sure, -c.estimate, c.id))
    others = [c for c in [top, *ties] if c is not chosen]
    return Decision(chosen, chosen.sure, top, others)


def decide_at_rate(judged: list[Judged]) -> Decision:
    """The cheapest configuration that surely meets every SLO at one offered rate. `judged` comes in the
    order the configurations were first measured (a search measures the base, the engine's defaults,
    first): of a tie, the first is chosen, so that a goodput mean that flips from one tune to the next
    does not flip the answer, and nothing is changed from the defaults without evidence."""
    sure = [j for j in judged if j.state == "pass"]
    if not sure:
        return Decision(None, closest=_closest(judged))
    cheapest = min(j.point.cost for j in sure)
    group = [j for j in sure if j.point.cost == cheapest]
    top = max(group, key=lambda j: (j.goodput.mean if j.goodput else -1.0, _neg(config_id(j.point.config))))
    tied = [j for j in group if j is top or not (j.goodput and top.goodput and separated(j.goodput, top.goodput))]
    return Decision(tied[0], tied[0].rate, top, tied[1:])


def _neg(s: str) -> list[int]:
    """A key that orders strings in reverse (so max() breaks full ties by the smallest id)."""
    return [-ord(ch) for ch in s]
