"""A user request between validation and its first step: its output state, its n scheduler requests,
and (overflow_policy summarize) the summary job that must finish before they can be made."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tuneserve.core.request import Request
from tuneserve.engine.output_processor import ParentState
from tuneserve.errors import RequestError
from tuneserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tuneserve.overflow.summarize import SummaryJob
from tuneserve.sampling_params import SamplingParams


@dataclass
class PreparedRequest:
    parent: ParentState
    children: list[Request]
    params: SamplingParams | None = None
    priority: int = 0
    summary: SummaryJob | None = None
    grammar: object = None  # structured output: the compiled grammar each sample gets a matcher of


def aborted_output(prepared: PreparedRequest, error: RequestError | None = None) -> RequestOutput:
    """The final output of a request aborted (or, with `error`, failed) while its prompt was being
    summarized."""
    p = prepared.parent
    n = prepared.params.n if prepared.params else 1
    outs = [CompletionOutput(i, "", [], "abort" if error is None else "error") for i in range(n)]
    m = RequestMetrics(arrival_time=p.arrival_time, finished_time=time.monotonic(),
                       num_prompt_tokens=len(p.prompt_token_ids))
    return RequestOutput(p.request_id, p.prompt, p.prompt_token_ids, outs, True, m, metadata=dict(p.metadata),
                         error=error)
