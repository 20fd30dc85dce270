"""Failure isolation: one request's failure ends that request only; a failed step resets the engine.

`fail_request` finishes a user request in error (all n samples; its blocks are free on return) while the
rest of the step goes on. `reset_after_failed_step` handles an exception that cannot be pinned to one
request (a failed forward of the whole batch, a scheduler bug): the step's requests end in error, the KV
manager and scheduler are rebuilt empty, and the requests that were not in the step are queued again
(recomputed like a preempted request). If that recovery itself fails, EngineFatalError: the caller must
exit so that a supervisor restarts the process.
"""

from __future__ import annotations

import time
import traceback

from tuneserve import faults
from tuneserve.core.request import Request, RequestStatus
from tuneserve.engine.prepared import aborted_output
from tuneserve.errors import EngineFatalError, RequestError
from tuneserve.log import log
from tuneserve.outputs import RequestOutput
from tuneserve.overflow.summarize import is_summary, parent_id_of_summary


def fail_request(engine, req: Request, err: RequestError) -> str | None:  # noqa: ANN001 - LLMEngine
    """End req's user request with `err`; returns the user request's id (None for an internal summary,
    whose waiting user request is reported failed at the next step)."""
    engine.stats.count_error(err.kind)
    log(f"request {req.request_id} failed ({err.kind}, HTTP {err.status}): {err.message}")
    if is_summary(req):
        engine.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_ERROR)
        engine.requests.pop(req.request_id, None)
        prepared = engine.summaries.pop(parent_id_of_summary(req), None)
        if prepared is not None:
            engine.unstarted_outputs.append(aborted_output(prepared, err))
        return None
    pid = engine.output.parent_of(req.request_id)
    if pid is None:
        return None
    engine.output.fail(pid, err)
    parent = engine.output.parents[pid]
    engine.scheduler.finish_requests(list(parent.children), RequestStatus.FINISHED_ERROR)
    for cid in parent.children:
        child = engine.requests.get(cid)
        if child is not None and child.is_finished:
            engine.finish_child(child)
    return pid


def reset_after_failed_step(engine, exc: BaseException) -> list[RequestOutput]:  # noqa: ANN001 - LLMEngine
    """Fail the step's requests, rebuild the scheduler and KV manager, requeue the others. Returns the
    failed requests' final outputs; raises EngineFatalError if the recovery fails."""
    engine.stats.count_error("step")
    log("a step failed as a whole; failing its requests and resetting the engine:\n"
               + "".join(traceback.format_exception(exc)).rstrip())
    engine.resetting = True
    try:
        faults.hit("reset")
        return _reset(engine, exc)
    except Exception as e:  # noqa: BLE001 - nothing left to fall back on
        raise EngineFatalError(f"resetting the engine after a failed step failed: {e!r} "
                               f"(the step failed with {exc!r})") from e
    finally:
        engine.resetting = False


def _reset(engine, exc: BaseException) -> list[RequestOutput]:  # noqa: ANN001 - LLMEngine
    err = RequestError(f"the engine failed a step ({type(exc).__name__}: {exc}) and was reset; this request "
                       "was dropped, retry it", 500, "step")
    old = engine.scheduler
    in_step = set(engine.step_ids) if engine.step_ids is not None else {r.request_id for r in old.running}
    failed_parents = {engine.output.parent_of(rid) for rid in in_step} - {None}
    outputs = []
    for rid in [rid for rid in in_step if rid in engine.requests and is_summary(engine.requests[rid])]:
        prepared = engine.summaries.pop(parent_id_of_summary(engine.requests.pop(rid)), None)
        if prepared is not None:
            outputs.append(aborted_output(prepared, err))
    survivors = sorted((r for r in old.requests.values() if r.request_id not in in_step
                        and engine.output.parent_of(r.request_id) not in failed_parents),
                       key=lambda r: old.queue_key(r.request_id))
    outputs += [_fail_now(engine, pid, err) for pid in failed_parents]
    if engine.spec is not None and engine.spec.draft is not None:
        engine.spec.draft.release_except(set())
    engine.build_scheduler()
    for req in survivors:
        _requeue(engine, req)
    return [o for o in outputs if o is not None]


def _fail_now(engine, pid: str, err: RequestError) -> RequestOutput | None:  # noqa: ANN001 - LLMEngine
    """Finish every live sample of a user request in error, outside the (discarded) scheduler."""
    engine.output.fail(pid, err)
    now = time.monotonic()
    for cid in list(engine.output.parents[pid].children):
        child = engine.requests.get(cid)
        if child is not None and not child.is_finished:
            child.status, child.finished_time = RequestStatus.FINISHED_ERROR, now
            engine.finish_child(child)
    out = engine.output.output(pid)
    engine.output.pop(pid)
    return out


def _requeue(engine, req: Request) -> None:  # noqa: ANN001 - LLMEngine
    """Queue a request that was not in the failed step again, to recompute its KV from its tokens."""
    ran = req.num_computed_tokens > 0 or req.num_output_tokens > 0
    req.status = RequestStatus.PREEMPTED if ran else RequestStatus.WAITING
    req.num_computed_tokens = 0
    req.spec_token_ids, req.spec_draft_probs = [], None
    engine.scheduler.add_request(req)
