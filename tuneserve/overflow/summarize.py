"""overflow_policy="summarize": condense the middle of an overlong prompt with the model itself.

The prompt keeps its head and tail; the middle is replaced by a summary that the model writes first, as
an internal greedy request. The user request starts when the summary is done; its output metadata
reports the original length, what was removed and the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tuneserve.core.request import Request
from tuneserve.errors import RequestError
from tuneserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tuneserve.sampling_params import SamplingParams

INSTRUCTION = ("Summarize the following text in a few sentences. Keep names, numbers and facts.\n\n"
               "Text: {text}\n\nSummary:")
SUFFIX = "::summary"


@dataclass
class SummaryJob:
    request: Request  # the internal summarization request
    head: list[int]
    tail: list[int]


def is_summary(req: Request) -> bool:
    return req.request_id.endswith(SUFFIX)


def parent_id_of_summary(req: Request) -> str:
    return req.request_id[: -len(SUFFIX)]


def plan_summary(engine, parent, plan, params: SamplingParams, priority: int) -> SummaryJob:  # noqa: ANN001
    """Split the kept budget between head, summary and tail; build the summary request."""
    tok = engine.tokenizer
    limit = engine.config.model.max_model_len
    keep = len(plan.ids)
    budget = max(8, min(128, keep // 4))  # summary tokens
    head_len = (keep - budget) // 2
    tail_len = keep - budget - head_len
    full = plan.ids[: plan.head_len] + plan.middle + plan.ids[plan.head_len:]
    head, tail = full[:head_len], full[len(full) - tail_len:]
    middle = full[head_len: len(full) - tail_len]
    frame = len(tok(INSTRUCTION.format(text=""), add_special_tokens=True).input_ids)
    room = limit - budget - frame - 8
    if len(middle) > room:  # the middle itself does not fit one summary call: keep its two ends
        middle = middle[: room // 2] + middle[len(middle) - (room - room // 2):]
    prompt = tok(INSTRUCTION.format(text=tok.decode(middle, skip_special_tokens=True))).input_ids[: limit - budget]
    sparams = SamplingParams(temperature=0, max_tokens=budget)
    req = Request(parent.request_id + SUFFIX, prompt, sparams, engine.config.model.arch.eos_token_ids,
                  parent.arrival_time, priority)
    parent.metadata.update(removed_range=[head_len, len(full) - tail_len], summary_budget_tokens=budget)
    return SummaryJob(req, head, tail)


def finish_summary(engine, prepared) -> None:  # noqa: ANN001 - LLMEngine, PreparedRequest
    """Put the finished summary between head and tail as the request's prompt; record it in metadata."""
    job = prepared.summary
    summary = [t for t in job.request.output_token_ids if t not in job.request.eos_token_ids]
    text = engine.tokenizer.decode(summary, skip_special_tokens=True).strip()
    ids = job.head + summary + job.tail  # the summary's own ids: re-tokenizing its text could grow it
    p = prepared.parent
    p.prompt_token_ids = ids
    p.metadata.update(summary=text, summary_tokens=len(summary), prompt_tokens=len(ids))
    engine.stats.prompt_tokens += len(job.request.prompt_token_ids)


def aborted_output(prepared, error: RequestError | None = None) -> RequestOutput:  # noqa: ANN001
    """The final output of a request aborted (or, with `error`, failed) while its prompt was being
    summarized."""
    p = prepared.parent
    n = prepared.params.n if prepared.params else 1
    outs = [CompletionOutput(i, "", [], "abort" if error is None else "error") for i in range(n)]
    m = RequestMetrics(arrival_time=p.arrival_time, finished_time=time.monotonic(),
                       num_prompt_tokens=len(p.prompt_token_ids))
    return RequestOutput(p.request_id, p.prompt, p.prompt_token_ids, outs, True, m, metadata=dict(p.metadata),
                         error=error)
