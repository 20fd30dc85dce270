"""Stop a serve run once it has surely missed a latency SLO, so an overloaded rate costs seconds, not minutes.

At an offered rate above what a configuration sustains, the queue grows for the whole run and the run
lasts several times its nominal num_prompts / rate; `tune`'s rate search meets such rates on its way to
the capacity. While a run goes on, every request has a lower bound on each latency: exact once it has
ended; for one in flight, the time it has waited so far (TTFT until its first token, E2EL until its end)
and, after its first token, the time since spread over the tokens it may still produce (TPOT); 0 for one
not yet sent. A latency percentile over the run's n requests (linear interpolation, numpy's default)
lies above a bound b as soon as n - floor(q/100 * (n-1)) of the lower bounds do: the interpolated value
then sits between two order statistics that are both above b. A mean lies above b once the lower bounds'
sum over n does. The run stops once its figure is surely over MARGIN times the bound, whatever the rest
does: stopped at the bound itself, the runs' lower bounds would sit just above it, and their interval
would straddle it (an unsure point, measured again and again) where the whole runs would surely fail.

A stopped run's record keeps every finished request as measured and each cut-off one as its lower bounds,
marked `partial` (left out of goodput): its figures are lower bounds of the ones the whole run would have
had, so an interval over runs that include it can fail a bound (the true figures are higher still) but
never pass it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from tuneserve.bench.slo import SLO

MARGIN = 1.5  # a run stops once a latency figure is surely over this multiple of its bound


def _can_stop(s: SLO) -> bool:
    """Whether a run's lower bounds can show this SLO missed: a latency ceiling."""
    return s.latency is not None and s.op == "<="


def lower_bounds(rec: Any, now: float) -> dict[str, float | None]:  # rec: serve.RequestRecord
    """Each latency of one request, exact if it has ended, else its lower bound at `now` (seconds from
    the start of the run)."""
    if rec.done:
        return {"ttft": rec.ttft, "tpot": rec.tpot, "e2el": rec.e2el}
    if not rec.sent:
        return {"ttft": 0.0, "tpot": 0.0, "e2el": 0.0}
    waited = max(0.0, now - rec.send_s)
    if not rec.chunk_s:
        return {"ttft": waited, "tpot": 0.0, "e2el": waited}
    since_first = max(0.0, now - rec.chunk_s[0])
    tpot = since_first / (rec.max_tokens - 1) if rec.max_tokens > 1 else None
    return {"ttft": rec.chunk_s[0] - rec.send_s, "tpot": tpot, "e2el": waited}


def surely_missed(slos: Sequence[SLO], bounds: Sequence[dict[str, float | None]],
                  margin: float = MARGIN) -> str | None:
    """The first latency SLO whose figure over the run is surely above `margin` times its bound, given every
    request's lower bounds (None: none is sure yet)."""
    for s in filter(_can_stop, slos):
        vals = [b[s.latency] for b in bounds if b.get(s.latency) is not None]
        n = len(vals)
        if n == 0:
            continue
        q, limit = s.percentile, margin * s.value
        if q is None:
            if sum(vals) / n > limit:
                return f"{s} surely missed: the mean of the lower bounds is already over {margin:g}x the bound"
            continue
        need = n - math.floor(q / 100 * (n - 1))
        over = sum(v > limit for v in vals)
        if over >= need:
            return (f"{s} surely missed: {over} of {n} requests already over {margin:g}x the bound ({need} decide "
                    f"the p{q:g})")
    return None


def stopper(slos: Sequence[SLO]) -> Callable[[Sequence[Any], float], str | None] | None:
    """The stop rule for a serve run under these SLOs (None when no latency SLO can stop it)."""
    if not any(map(_can_stop, slos)):
        return None

    def stop(records: Sequence[Any], now: float) -> str | None:
        return surely_missed(slos, [lower_bounds(r, now) for r in records])

    return stop
