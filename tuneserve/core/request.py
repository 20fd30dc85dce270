"""Request: one sequence's tokens, progress, status and timestamps, as the scheduler sees it."""

from __future__ import annotations

import enum
import time

from tuneserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # waiting again after its KV was dropped; recomputes prompt + output so far
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13  # the engine failed it (tuneserve/errors.py); the others went on

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """A sequence being generated.

    `num_computed_tokens` counts tokens whose KV is in the cache; it catches up with `num_tokens`
    (prompt + output). That one counter covers prefill, chunked prefill, prefix-cache hits, decode and
    speculation (draft tokens sit in `spec_token_ids` until verified).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        priority: int = 0,
        leader_id: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.priority = priority
        self.leader_id = leader_id  # n > 1: the sibling whose prompt blocks this one shares
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.spec_token_ids: list[int] = []
        self.grammar = None  # structured output: its matcher (structured/backend.Matcher), None if unconstrained
        self.spec_draft_probs = None  # (k, V) tensor when drafts were sampled from a draft model
        self.spec_num_drafts = 0  # verification rounds
        self.spec_num_draft_tokens = 0  # drafts verified over the request's life
        self.spec_num_accepted_tokens = 0
        self.spec_accepted_per_pos: list[int] = []  # accepted drafts at draft position 0, 1, ...
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks (core/block_pool.py)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = -1  # prefix-cache hit at first scheduling; -1 until scheduled
        self.num_preemptions = 0
        # timestamps (time.monotonic)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times: list[float] = []
        self.finished_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def max_tokens(self) -> int:
        assert self.params.max_tokens is not None, "max_tokens is resolved when the request is added"
        return self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_token(self, token_id: int, now: float) -> None:
        """Add one generated token."""
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)

    def check_stop(self, max_model_len: int) -> bool:
        """Token-level stop conditions after the last appended token; sets status when stopped.

        Stop strings are detokenizer work and are checked by the engine's output processor.
        """
        last = self.all_token_ids[-1]
        min_ok = self.num_output_tokens > self.params.min_tokens
        if min_ok and not self.params.ignore_eos and last in self.eos_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
        elif min_ok and last in self.params.stop_token_ids:
            self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
        elif self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
        else:
            return False
        return True


def count_spec_step(counters, drafted: int, accepted: int) -> None:  # noqa: ANN001 - Request or EngineStats
    """Add one verified speculation (drafted tokens, how many accepted) to the spec_* counters of a request
    or of the whole engine: both keep the same four fields."""
    counters.spec_num_drafts += 1
    counters.spec_num_draft_tokens += drafted
    counters.spec_num_accepted_tokens += accepted
    per_pos = counters.spec_accepted_per_pos
    per_pos.extend([0] * (drafted - len(per_pos)))
    for j in range(accepted):
        per_pos[j] += 1
