"""What the engine returns to users: RequestOutput with its completions and per-request metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tuneserve.errors import RequestError


@dataclass
class TokenLogprobs:
    """Logprob of the chosen token and the top-N alternatives at one position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestMetrics:
    """Timings of one request (seconds, time.monotonic clock) and its token counts.

    queue_time: arrival -> first scheduled; ttft: arrival -> first token; tpot: mean time per output
    token after the first, (last - first) / (n - 1); e2e: arrival -> finish.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)  # filled when the request finishes

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        n = self.num_generated_tokens
        if n < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (n - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time

    @property
    def spec_acceptance_rate(self) -> float | None:
        d = self.spec_num_draft_tokens
        return None if d == 0 else self.spec_num_accepted_tokens / d

    @property
    def spec_mean_acceptance_length(self) -> float | None:
        """1 + accepted drafts per verification round (tokens per target step while speculating)."""
        return None if self.spec_num_drafts == 0 else 1 + self.spec_num_accepted_tokens / self.spec_num_drafts

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("inter_token_latencies")
        d.update(queue_time=self.queue_time, ttft=self.ttft, tpot=self.tpot, e2e=self.e2e,
                 spec_acceptance_rate=self.spec_acceptance_rate,
                 spec_mean_acceptance_length=self.spec_mean_acceptance_length)
        return d


@dataclass
class CompletionOutput:
    """One of the n samples of a request (cumulative so far)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metadata: dict = field(default_factory=dict)  # e.g. what an overflow policy did to the prompt
    error: RequestError | None = None  # set when the engine failed the request (finish_reason "error")
