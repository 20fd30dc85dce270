"""SamplingParams: how one request picks its tokens and when it stops. Validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

_EPS = 1e-5


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters (vLLM names and defaults).

    temperature 0 means greedy. top_k 0 or -1 disables top-k. Penalties follow the OpenAI/vLLM
    definitions: presence and frequency act on generated tokens, repetition on prompt and generated.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_strings = tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "an integer in [1, 128]", self.n)
        _check(0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]", self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "0 or -1 (off) or a positive integer",
               self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        _check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "in (0, 2]", self.repetition_penalty)
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", "a positive integer or None", self.max_tokens)
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", ">= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an integer or None", self.seed)
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "in [0, 20] or None", self.logprobs)
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
               "in [0, 20] or None", self.prompt_logprobs)
        _check(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
               "a non-empty string or a list of non-empty strings", self.stop)
        _check(len(self.stop_strings) <= 16, "stop", "at most 16 strings", self.stop)
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "a list of non-negative token ids", self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token."""
        return self.temperature < _EPS

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def for_child(self, index: int) -> SamplingParams:
        """The parameters of the index-th of n samples: n=1 and a seed of its own if seeded."""
        import dataclasses

        seed = self.seed
        if seed is not None and index > 0:
            seed = (seed * 1_000_003 + index) % (2**63)
        return dataclasses.replace(self, n=1, seed=seed)
