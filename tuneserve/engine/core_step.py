"""The core of a step, as the algorithm reads: execute the scheduled batch, update the scheduler with what
came out, learn from it; after the outputs are emitted, draft for the next step.

Scheduling itself stays with the engine (it must know the step's requests before anything can fail).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tuneserve import faults
from tuneserve.core.request import Request, count_spec_step
from tuneserve.core.scheduler import Scheduler
from tuneserve.core.step_io import RunnerOutput, SchedulerOutput
from tuneserve.engine.stats import EngineStats
from tuneserve.log import log
from tuneserve.speculative.decoder import SpecDecoder
from tuneserve.worker.model_runner import ModelRunner


@dataclass
class StepResult:
    """A step's batch and what came of it: per scheduled request, its runner output and (keyed by request
    id) an error raised while the scheduler took that output."""

    sched: SchedulerOutput
    out: RunnerOutput
    update_errors: dict[str, Exception]


def execute_and_update(sched: SchedulerOutput, scheduler: Scheduler, runner: ModelRunner,
                       spec: SpecDecoder | None, stats: EngineStats, started: float) -> StepResult:
    """Run the batch, hand its output to the scheduler, count it; `started` is when scheduling began (the
    step's cost, which the draft-length controller learns from, includes scheduling)."""
    out = runner.execute(sched)
    update_errors = scheduler.update(sched, out)
    stats.num_steps += 1
    for drafted, accepted in zip(out.num_draft_tokens, out.num_accepted):
        if drafted:
            count_spec_step(stats, drafted, accepted)
    seconds = time.perf_counter() - started
    stats.step_seconds += seconds
    if spec is not None:
        spec.observe(sched, out, seconds)
    return StepResult(sched, out, update_errors)


def propose_drafts(spec: SpecDecoder | None, running: list[Request], stats: EngineStats) -> None:
    """Drafts for the next step. Drafting is optional work: if it fails, this step's drafts are dropped
    and the draft model's state is released (it catches up again), and serving goes on."""
    if spec is None:
        return
    try:
        faults.hit("propose")
        spec.propose(running)
    except Exception as e:  # noqa: BLE001 - speculation is an optimization
        stats.count_error("propose")
        log(f"drafting failed ({type(e).__name__}: {e}); this step goes on without drafts")
        for r in running:
            r.spec_token_ids, r.spec_draft_probs = [], None
        if spec.draft is not None:
            spec.draft.release_except(set())
