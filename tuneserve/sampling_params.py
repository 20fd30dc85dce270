"""SamplingParams: how one request picks its tokens and when it stops. Validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_EPS = 1e-5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 128  # as OpenAI
MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
MAX_STOP = 64  # stop strings are searched at every token: count and length bound that work
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 100.0  # |bias|, as OpenAI
# (low, high, low excluded) of each float field; the server's request bodies use the same bounds
FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 100.0, False), "top_p": (0.0, 1.0, True), "min_p": (0.0, 1.0, False),
    "presence_penalty": (-2.0, 2.0, False), "frequency_penalty": (-2.0, 2.0, False),
    "repetition_penalty": (0.0, 2.0, True)}


class ParamError(ValueError):
    """A ValueError that names the request field to change (`param`), for the server's 400s."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ParamError(name, f"{name} must be {allowed}, got {_short(value)}")


def _short(value: object, limit: int = 80) -> str:
    """repr of a value cut to `limit` characters (repr escapes lone surrogates, so it is always UTF-8)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def is_int(v: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: object) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def utf8_error(text: str) -> str | None:
    """Why text cannot be encoded as UTF-8 (a lone UTF-16 surrogate, as JSON's \\ud800 escapes allow), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"must be valid UTF-8 text, but holds a lone surrogate {text[e.start]!r} at index {e.start}"
    return None


MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain a request's output (vLLM's names); exactly one of: `json`, a JSON schema (dict or string);
    `json_object`, any JSON object; `regex`; `choice`, one of these strings; `grammar`, a Lark/EBNF grammar
    (GBNF as llama.cpp users write it is converted). tuneserve/structured compiles them."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    field: str = "structured_outputs"  # the request field it came from, named in errors (or response_format)

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        _check(len(given) == 1, self.field, "exactly one of json, json_object, regex, choice, grammar",
               given)
        _check(self.json is None or isinstance(self.json, (dict, str)), self.field,
               "a JSON schema (an object or its JSON text) in json", self.json)
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, str) and v), self.field, f"a non-empty string in {name}", v)
        c = self.choice
        _check(c is None or (isinstance(c, (list, tuple)) and 0 < len(c) <= MAX_CHOICES
                             and all(isinstance(s, str) and s for s in c)),
               self.field, f"1 to {MAX_CHOICES} non-empty strings in choice", c)


@dataclass
class SamplingParams:
    """Per-request sampling and stopping parameters (vLLM names and defaults).

    temperature 0 means greedy. top_k 0 or -1 disables top-k. Penalties follow the OpenAI/vLLM
    definitions: presence and frequency act on generated tokens, repetition on prompt and generated.
    logit_bias is OpenAI's: a bias added to a token's logit before sampling (+100 forces it, -100 bans it).
    Checks that need the vocabulary (top_k, token ids) are in `check_vocab`, which the engine calls.
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
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (tuneserve/structured)
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.stop is None or isinstance(self.stop, (list, tuple)), "stop",
               "a string, a list of strings or None", self.stop)
        _check(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)), "stop_token_ids",
               "a list of token ids or None", self.stop_token_ids)
        self.stop_strings = tuple(self.stop or ())
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check(is_int(self.n) and 1 <= self.n <= MAX_N, "n", f"an integer in [1, {MAX_N}]", self.n)
        for name, (lo, hi, open_low) in FLOAT_BOUNDS.items():
            v = getattr(self, name)
            ok = is_real(v) and (lo < v if open_low else lo <= v) and v <= hi
            _check(ok, name, f"in {'(' if open_low else '['}{lo:g}, {hi:g}]", v)
        _check(is_int(self.top_k) and self.top_k >= 0, "top_k", "0 or -1 (off) or a positive integer", self.top_k)
        self._validate_lengths()
        _check(self.seed is None or (is_int(self.seed) and INT64_MIN <= self.seed <= INT64_MAX), "seed",
               "a signed 64-bit integer or None", self.seed)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS), name, f"in [0, {MAX_LOGPROBS}] or None", v)
        self._validate_stops()
        self._validate_logit_bias()
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", "a StructuredOutputsParams or None", self.structured_outputs)

    def _validate_lengths(self) -> None:
        _check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", "a positive integer or None", self.max_tokens)
        _check(is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "an integer >= 0", self.min_tokens)
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"<= max_tokens ({self.max_tokens})", self.min_tokens)

    def _validate_stops(self) -> None:
        stops = self.stop_strings
        _check(all(isinstance(s, str) and s for s in stops), "stop",
               "a non-empty string or a list of non-empty strings", self.stop)
        _check(len(stops) <= MAX_STOP, "stop", f"at most {MAX_STOP} strings", len(stops))
        _check(all(len(s) <= MAX_STOP_CHARS for s in stops), "stop", f"strings of at most {MAX_STOP_CHARS} "
               "characters", max(map(len, stops), default=0))
        bad = next((err for s in stops if (err := utf8_error(s))), None)
        if bad:
            raise ParamError("stop", f"stop {bad}")
        ids = self.stop_token_ids
        _check(all(is_int(t) and t >= 0 for t in ids), "stop_token_ids", "a list of non-negative token ids", ids)
        _check(len(ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids", len(ids))

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        _check(isinstance(bias, dict), "logit_bias", "a dict of token id -> bias", bias)
        _check(all(is_int(t) and t >= 0 for t in bias), "logit_bias", "keyed by non-negative token ids",
               next((t for t in bias if not (is_int(t) and t >= 0)), None))
        _check(all(is_real(b) and abs(b) <= MAX_LOGIT_BIAS for b in bias.values()), "logit_bias",
               f"biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
               next((b for b in bias.values() if not (is_real(b) and abs(b) <= MAX_LOGIT_BIAS)), None))

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ParamError for a token id or top_k that the model's vocabulary cannot honour."""
        _check(self.top_k <= vocab_size, "top_k", f"-1, 0 or at most the vocabulary size ({vocab_size})", self.top_k)
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        _check(not bad, "stop_token_ids", f"token ids in [0, {vocab_size})", bad[:5])
        bad = [t for t in self.logit_bias or () if t >= vocab_size]
        _check(not bad, "logit_bias", f"keyed by token ids in [0, {vocab_size})", bad[:5])

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token."""
        return self.temperature < _EPS

    @property
    def uses_penalties(self) -> bool:
        """True when sample.apply_penalties has work on this row beyond min_tokens: a penalty or a logit bias."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))

    def for_child(self, index: int) -> SamplingParams:
        """The parameters of the index-th of n samples: n=1 and a seed of its own if seeded."""
        import dataclasses

        seed = self.seed
        if seed is not None and index > 0:
            seed = (seed * 1_000_003 + index) % (2**63)
        return dataclasses.replace(self, n=1, seed=seed)
