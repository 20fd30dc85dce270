"""How many tokens to speculate this step: the k that maximises expected tokens per second.

Two measured quantities drive the choice:
  - acceptance: the probability that the draft at position i is accepted given that positions < i were
    (counted over all verified drafts), which gives the expected tokens a request emits with k drafts,
    E(k) = 1 + a_1 + a_1 a_2 + ... + a_1 ... a_k;
  - cost: the step time T(N) (scheduling and the forward) as a function of the tokens in the step, a
    table over N that is seeded by a short calibration at start and refined with every step's measured
    time; plus the draft model's time per drafted position, D(B), for draft-model speculation, or the
    n-gram lookups' time per step, P(B).
With B requests of which a fraction h gets drafts (n-gram lookups can miss), k is chosen to maximise
  B (1 + h (E(k) - 1)) / (T(N0 + h B k) + k D(B) + P(B)).
At large batches T grows with N (the step is compute-bound), so k shrinks or drops to 0: speculation
turns itself off where verifying costs more than it saves.
The acceptance the choice needs can only be measured by speculating, so the controller explores: until
EXPLORE_POSITIONS drafts have been verified it drafts the full k for at most PROBE_REQUESTS requests of the
step (a prior alone switched a paying draft model off for good), and while the choice is 0 it repeats such
a probe every PROBE_EVERY steps, so a change of workload can turn speculation back on. Old observations
fade (counts halve past DECAY_AT) for the same reason.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class CostTable:
    """Step time as a function of batched tokens. Observations fall into log-spaced buckets, each keeping
    an EMA of (tokens, seconds); estimates interpolate linearly between the buckets' points."""

    alpha: float = 0.2
    points: dict[int, list[float]] = field(default_factory=dict)  # bucket -> [tokens, seconds]
    seeded: set[int] = field(default_factory=set)  # buckets that hold only a seed so far

    def observe(self, n: float, seconds: float, seed: bool = False) -> None:
        """Record a step of n tokens that took `seconds`. A seed (the start-up calibration: n one-token
        sequences, no context) is replaced by the bucket's first real step rather than averaged with it:
        real steps (drafts of many requests over long contexts) cost more, and an EMA that starts from
        the seed stays optimistic for many steps (measured: k = 5 chosen at batch 32, 0.93x of off)."""
        b = max(0, int(n).bit_length() - 1)  # floor(log2 n)
        old = self.points.get(b)
        if seed:
            self.seeded.add(b)
        elif b in self.seeded:
            self.seeded.discard(b)
            old = None
        if old is None:
            self.points[b] = [float(n), seconds]
        else:
            old[0] += self.alpha * (n - old[0])
            old[1] += self.alpha * (seconds - old[1])

    @property
    def empty(self) -> bool:
        return not self.points

    def estimate(self, n: float) -> float:
        """Interpolated step time for n tokens (linear past the ends; proportional with one point)."""
        pts = sorted(self.points.values())
        if not pts:
            return 1.0
        if len(pts) == 1:
            return pts[0][1] * max(1.0, n / pts[0][0])
        xs = [p[0] for p in pts]
        i = min(max(bisect.bisect_left(xs, n), 1), len(pts) - 1)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        slope = (y1 - y0) / (x1 - x0) if x1 > x0 else 0.0
        return max(1e-6, y0 + slope * (n - x0))


EXPLORE_POSITIONS = 16  # verified position-0 drafts before the measured acceptance is trusted
PROBE_EVERY = 32  # steps between probes while speculation is off
PROBE_REQUESTS = 2  # requests that draft in an exploration or probe step (bounds its cost at large batches)
DECAY_AT = 2048  # position-0 drafts after which all acceptance counts halve


@dataclass
class AcceptanceStats:
    """Per-position conditional acceptance, from verified drafts."""

    max_k: int
    reached: list[int] = field(default_factory=list)  # drafts verified at position i
    accepted: list[int] = field(default_factory=list)  # of those, accepted
    proposals: int = 0  # requests asked for drafts
    hits: int = 0  # of those, that got at least one draft

    def __post_init__(self) -> None:
        self.reached = [0] * self.max_k
        self.accepted = [0] * self.max_k

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if self.reached and self.reached[0] >= DECAY_AT:
            self.reached = [n // 2 for n in self.reached]
            self.accepted = [n // 2 for n in self.accepted]
        for i in range(num_drafts):
            if i > num_accepted:
                break
            self.reached[i] += 1
            self.accepted[i] += i < num_accepted

    def rate(self, i: int, prior: float = 0.6, weight: float = 4.0) -> float:
        """Smoothed P(accept position i | reached i)."""
        return (self.accepted[i] + prior * weight) / (self.reached[i] + weight)

    def expected_tokens(self, k: int) -> float:
        e, p = 1.0, 1.0
        for i in range(k):
            p *= self.rate(i)
            e += p
        return e

    @property
    def hit_rate(self) -> float:
        return (self.hits + 1) / (self.proposals + 1)


class KController:
    """Chooses the speculation length per step; `pinned` disables adaptation."""

    def __init__(self, max_k: int, adaptive: bool = True) -> None:
        self.max_k = max_k
        self.adaptive = adaptive
        self.stats = AcceptanceStats(max_k)
        self.target = CostTable()
        self.draft_per_position = CostTable()  # draft model time for one drafted position at batch B
        self.propose_time = CostTable()  # n-gram lookups of a step at batch B (a cost only when k > 0)
        self.off_steps = 0  # steps since speculation was last chosen

    def plan(self, batch: int, base_tokens: int) -> tuple[int, int]:
        """(k, how many of the `batch` requests that could speculate draft k tokens) for this step."""
        if not self.adaptive or batch == 0:
            return (self.max_k, batch) if batch else (0, 0)
        if self.stats.reached[0] < EXPLORE_POSITIONS:
            return self.max_k, min(batch, PROBE_REQUESTS)
        k = self.choose(batch, base_tokens)
        if k:
            self.off_steps = 0
            return k, batch
        self.off_steps += 1
        if self.off_steps % PROBE_EVERY == 0:
            return self.max_k, min(batch, PROBE_REQUESTS)
        return 0, 0

    def choose(self, batch: int, base_tokens: int) -> int:
        """The k that maximises expected tokens per second for `batch` requests and `base_tokens` in the
        step, from what has been measured so far."""
        if not self.adaptive or batch == 0:
            return self.max_k if batch else 0
        h = self.stats.hit_rate
        best_k, best = 0, batch / self.target.estimate(base_tokens)
        for k in range(1, self.max_k + 1):
            tokens = batch * (1 + h * (self.stats.expected_tokens(k) - 1))
            cost = self.target.estimate(base_tokens + h * batch * k)
            if not self.draft_per_position.empty:
                cost += k * self.draft_per_position.estimate(batch)
            if not self.propose_time.empty:
                cost += self.propose_time.estimate(batch)
            if tokens / cost > best:
                best_k, best = k, tokens / cost
        return best_k
