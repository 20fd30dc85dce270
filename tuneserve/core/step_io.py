"""The scheduler <-> runner contract: what runs this step, and what came out of it."""

from __future__ import annotations

from dataclasses import dataclass, field

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
class TokenLogprobs:
    """Logprob of the chosen token and the top-N alternatives at one position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RunnerOutput:
    """Per scheduled request, in SchedulerOutput order."""

    sampled: list[list[int]]  # new tokens (empty for a prompt chunk that does not end the prompt)
    logprobs: list[list[TokenLogprobs] | None]
    prompt_logprobs: list[list[TokenLogprobs] | None]  # for the prompt positions of this chunk
    num_draft_tokens: list[int] = field(default_factory=list)
    num_accepted: list[int] = field(default_factory=list)
    # index -> the exception that ended that request this step (tuneserve/errors.py); its other fields are
    # empty and the scheduler leaves it alone, the engine finishes it with an error
    errors: dict[int, Exception] = field(default_factory=dict)


def scatter_output(out: RunnerOutput, live: list[int], n: int, errors: dict[int, Exception]) -> RunnerOutput:
    """The RunnerOutput of n requests from that of the `live` ones that ran; the others failed with `errors`."""
    full = RunnerOutput([[] for _ in range(n)], [None] * n, [None] * n, [0] * n, [0] * n, dict(errors))
    for j, i in enumerate(live):
        full.sampled[i], full.logprobs[i], full.prompt_logprobs[i] = out.sampled[j], out.logprobs[j], \
            out.prompt_logprobs[j]
        if out.num_draft_tokens:
            full.num_draft_tokens[i], full.num_accepted[i] = out.num_draft_tokens[j], out.num_accepted[j]
    for j, e in out.errors.items():
        full.errors[live[j]] = e
    return full
