"""Fault injection for tests: make a chosen phase raise for a chosen request at a chosen step.

Test-only by construction: there is no flag, environment variable or request field that turns it on; a
test installs an injector with `inject(...)` (a context manager) in the engine's own process. With none
installed, each hook is one global read.

Points (where the hook sits): "prepare", "sample", "verify" and "prompt_logprobs" in the runner,
"detokenize" in the engine's output processing, "stop_check" in the scheduler's update (each for one
request); "forward" (the whole batch's forward pass), "propose" (drafting for the next step) and "reset"
(the engine's recovery itself) for the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

REQUEST_POINTS = ("prepare", "sample", "verify", "prompt_logprobs", "detokenize", "stop_check")
BATCH_POINTS = ("forward", "propose", "reset")
POINTS = REQUEST_POINTS + BATCH_POINTS


class InjectedFault(RuntimeError):
    """The exception an injected fault raises."""


@dataclass(frozen=True)
class Fault:
    """A request point raises from the `at`-th time (0-based) it is reached for `request_id` on (with
    request_id None: for whichever request reaches it the at-th time overall, and then for that request
    only): the failure is permanent, so a retry of the request's step work (the runner re-picks tokens one
    request at a time after a batched failure) fails again. A batch point raises on its at-th reach and
    the `times - 1` after it."""

    point: str
    request_id: str | None = None
    at: int = 0
    times: int = 1

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"unknown fault point {self.point!r}; one of {POINTS}")


class FaultInjector:
    """Counts how often each (point, request) is reached and raises where a Fault says so."""

    def __init__(self, faults: list[Fault]) -> None:
        self.faults = list(faults)
        self.reached: Counter = Counter()
        self.raised: list[tuple[str, str | None]] = []
        self.victims: dict[int, str | None] = {}  # request fault index -> the request it failed

    def check(self, point: str, request_id: str | None = None) -> None:
        for i, f in enumerate(self.faults):
            if f.point != point:
                continue
            if point in BATCH_POINTS:
                n = self._count((i, None))
                fire = f.at <= n < f.at + f.times
            elif i in self.victims:  # fired before: the failure is permanent for that request
                n, fire = -1, self.victims[i] == request_id
            else:
                if f.request_id is not None and f.request_id != request_id:
                    continue
                n = self._count((i, f.request_id))
                fire = n >= f.at
                if fire:
                    self.victims[i] = request_id
            if fire:
                self.raised.append((point, request_id))
                raise InjectedFault(f"injected fault at {point} for {request_id or 'the batch'} (reach {n})")

    def _count(self, key: tuple) -> int:
        n = self.reached[key]
        self.reached[key] += 1
        return n


ACTIVE: FaultInjector | None = None


def hit(point: str, request_id: str | None = None) -> None:
    """The hook: raises InjectedFault when an installed injector says so."""
    if ACTIVE is not None:
        ACTIVE.check(point, request_id)


@contextmanager
def inject(*faults: Fault) -> Iterator[FaultInjector]:
    """Install an injector for the duration of a `with` block."""
    global ACTIVE
    prev, ACTIVE = ACTIVE, FaultInjector(list(faults))
    try:
        yield ACTIVE
    finally:
        ACTIVE = prev
