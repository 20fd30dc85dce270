"""overflow_policy="summarize": condense the middle of an overlong prompt with the model itself.

The prompt keeps its head and tail; the middle is replaced by a summary that the model writes first, as
an internal greedy request. The user request starts when the summary is done; its output metadata
reports the original length, what was removed and the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneserve.core.request import Request
from tuneserve.overflow.policy import FitPlan
from tuneserve.sampling_params import SamplingParams

INSTRUCTION = ("Summarize the following text in a few sentences. Keep names, numbers and facts.\n\n"
               "Text: {text}\n\nSummary:")
SUFFIX = "::summary"


@dataclass
class SummaryJob:
    request: Request  # the internal summarization request
    head: list[int]
    tail: list[int]
    metadata: dict = field(default_factory=dict)  # for the user request's output


def is_summary(req: Request) -> bool:
    return req.request_id.endswith(SUFFIX)


def parent_id_of_summary(req: Request) -> str:
    return req.request_id[: -len(SUFFIX)]


def plan_summary(tokenizer, max_model_len: int, eos_token_ids: tuple[int, ...] | list[int], request_id: str,  # noqa: ANN001
                 plan: FitPlan, arrival_time: float, priority: int) -> SummaryJob:
    """Split the kept budget between head, summary and tail; build the summary request. The job's
    `metadata` goes into the user request's output metadata."""
    keep = len(plan.ids)
    budget = max(8, min(128, keep // 4))  # summary tokens
    head_len = (keep - budget) // 2
    tail_len = keep - budget - head_len
    full = plan.ids[: plan.head_len] + plan.middle + plan.ids[plan.head_len:]
    head, tail = full[:head_len], full[len(full) - tail_len:]
    middle = full[head_len: len(full) - tail_len]
    frame = len(tokenizer(INSTRUCTION.format(text=""), add_special_tokens=True).input_ids)
    room = max_model_len - budget - frame - 8
    if len(middle) > room:  # the middle itself does not fit one summary call: keep its two ends
        middle = middle[: room // 2] + middle[len(middle) - (room - room // 2):]
    text = tokenizer.decode(middle, skip_special_tokens=True)
    prompt = tokenizer(INSTRUCTION.format(text=text)).input_ids[: max_model_len - budget]
    req = Request(request_id + SUFFIX, prompt, SamplingParams(temperature=0, max_tokens=budget), tuple(eos_token_ids),
                  arrival_time, priority)
    return SummaryJob(req, head, tail, {"removed_range": [head_len, len(full) - tail_len],
                                        "summary_budget_tokens": budget})


def finish_summary(tokenizer, job: SummaryJob) -> tuple[list[int], dict]:  # noqa: ANN001
    """The user request's new prompt (head + the finished summary + tail) and what to add to its metadata."""
    summary = [t for t in job.request.output_token_ids if t not in job.request.eos_token_ids]
    text = tokenizer.decode(summary, skip_special_tokens=True).strip()
    ids = job.head + summary + job.tail  # the summary's own ids: re-tokenizing its text could grow it
    return ids, {"summary": text, "summary_tokens": len(summary), "prompt_tokens": len(ids)}
