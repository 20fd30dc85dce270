"""What passes between scheduler and runner each step: the batch to run (SchedulerOutput of
ScheduledRequests) and what came out of it (RunnerOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneserve.outputs import TokenLogprobs
from tuneserve.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step.

    The runner computes KV for `token_ids` at positions start_pos.. and, when `sample` is set, samples
    the next token after them (verifying the trailing `num_draft_tokens` speculative tokens first).
    """

    req_id: str
    token_ids: list[int]  # tokens to run: a prompt chunk, the last sampled token, and/or drafts
    start_pos: int  # = the request's num_computed_tokens
    block_table: tuple[list[int], ...]  # per KV group, the whole table (attention reads all of it)
    params: SamplingParams
    sample: bool  # this chunk reaches the end of the known tokens: sample the next one
    num_draft_tokens: int = 0
    draft_probs: object = None  # (num_draft_tokens, V) tensor; None: drafts are one-hot (n-gram, greedy)
    prompt_len: int = 0
    # references to the request's token lists, read-only for the runner (penalties, prompt logprobs)
    all_token_ids: list[int] = field(default_factory=list)
    grammar: object = None  # the request's matcher (structured output): the runner masks its sampled rows

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest]
    num_batched_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)  # since the last step (for per-request state)
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class RunnerOutput:
    """Per scheduled request, in SchedulerOutput order. Every list has one entry per request (checked)."""

    sampled: list[list[int]]  # new tokens (empty for a prompt chunk that does not end the prompt)
    logprobs: list[list[TokenLogprobs] | None]
    prompt_logprobs: list[list[TokenLogprobs] | None]  # for the prompt positions of this chunk
    num_draft_tokens: list[int] = field(default_factory=list)  # empty: no request had drafts
    num_accepted: list[int] = field(default_factory=list)
    # index -> the exception that ended that request this step (tuneserve/errors.py); its other fields are
    # empty and the scheduler leaves it alone, the engine finishes it with an error
    errors: dict[int, Exception] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.sampled)
        if not self.num_draft_tokens and not self.num_accepted:
            self.num_draft_tokens, self.num_accepted = [0] * n, [0] * n
        lists = ("logprobs", "prompt_logprobs", "num_draft_tokens", "num_accepted")
        lengths = {f: len(getattr(self, f)) for f in lists}
        wrong = {f: k for f, k in lengths.items() if k != n}
        if wrong:
            raise ValueError(f"RunnerOutput for {n} requests has lists of other lengths: {wrong}")
        if any(not 0 <= i < n for i in self.errors):
            raise ValueError(f"RunnerOutput errors name requests outside [0, {n}): {sorted(self.errors)}")

    def __len__(self) -> int:
        return len(self.sampled)

    @classmethod
    def empty(cls, n: int) -> RunnerOutput:
        """n requests that produced nothing this step."""
        return cls([[] for _ in range(n)], [None] * n, [None] * n, [0] * n, [0] * n)

    @classmethod
    def concat(cls, parts: list[RunnerOutput], errors: dict[int, Exception]) -> RunnerOutput:
        """The outputs of consecutive groups of requests as one; `errors` are indexed in the whole."""
        fields = ("sampled", "logprobs", "prompt_logprobs", "num_draft_tokens", "num_accepted")
        return cls(*([x for p in parts for x in getattr(p, f)] for f in fields), errors=dict(errors))


def scatter_output(out: RunnerOutput, live: list[int], n: int, errors: dict[int, Exception]) -> RunnerOutput:
    """The RunnerOutput of n requests from that of the `live` ones that ran; the others failed with `errors`."""
    if len(out) != len(live):
        raise ValueError(f"{len(out)} outputs for {len(live)} requests that ran")
    full = RunnerOutput.empty(n)
    full.errors = dict(errors)
    for j, i in enumerate(live):
        full.sampled[i], full.logprobs[i], full.prompt_logprobs[i] = out.sampled[j], out.logprobs[j], \
            out.prompt_logprobs[j]
        full.num_draft_tokens[i], full.num_accepted[i] = out.num_draft_tokens[j], out.num_accepted[j]
    for j, e in out.errors.items():
        full.errors[live[j]] = e
    return full
