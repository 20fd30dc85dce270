"""Per-request size limits of the server: each one a `tuneserve serve` flag, checked before a request is
prepared, and written into the OpenAPI schema (schema.py) so that clients and fuzzers see them.

They bound the work one request can ask for. Bounds fixed by the engine itself (logprobs <= 20, n <= 128,
stop strings, token ids, seeds) are checked by SamplingParams and the request models; a limit here may not
exceed them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from tuneserve.sampling_params import MAX_N, MAX_STOP, MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, ParamError

# limit -> (flag help, the most it may be: an engine bound, or None)
_DOC: dict[str, tuple[str, int | None]] = {
    "max_n": ("samples per prompt (n)", MAX_N),
    "max_prompts": ("prompts in one /v1/completions request", None),
    "max_prompt_chars": ("characters of a request's text prompts together (chat: of its messages)", None),
    "max_messages": ("messages in one chat request", None),
    "max_stop": ("stop strings per request", MAX_STOP),
    "max_stop_chars": ("characters of one stop string", MAX_STOP_CHARS),
    "max_stop_token_ids": ("stop_token_ids per request", MAX_STOP_TOKEN_IDS),
    "max_logit_bias": ("logit_bias entries per request", None),
}


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (each limit is inclusive)."""

    max_n: int = 16
    max_prompts: int = 32
    max_prompt_chars: int = 1 << 20
    max_messages: int = 1024
    max_stop: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            v, cap = getattr(self, f.name), _DOC[f.name][1]
            if not isinstance(v, int) or v < 1 or (cap is not None and v > cap):
                raise ValueError(f"{f.name} must be an integer in [1, {cap or 'inf'}], got {v!r}")

    # ----- checks (ParamError names the field; the server turns it into a 400) --------------------
    def check_body(self, body) -> None:  # noqa: ANN001 - a completion or chat body
        """Every limit the body can break: cheap, so it can run before any work is reserved for it."""
        self.check_sampling(body)
        if hasattr(body, "messages"):
            self.check_messages([m.text() for m in body.messages])
        else:
            self.check_prompts(body.prompts())

    def check_sampling(self, body) -> None:  # noqa: ANN001 - a request body with the sampling fields
        """n, stop strings, stop_token_ids and logit_bias of a completion or chat body."""
        self._at_most("n", body.n, "max_n")
        stops = body.stop_list()
        self._at_most("stop", len(stops), "max_stop", "strings")
        self._at_most("stop", max(map(len, stops), default=0), "max_stop_chars", "characters per string")
        self._at_most("stop_token_ids", len(body.stop_token_ids or ()), "max_stop_token_ids", "ids")
        self._at_most("logit_bias", len(body.logit_bias or {}), "max_logit_bias", "entries")

    def check_prompts(self, prompts: list[str | list[int]]) -> None:
        """The number of prompts and their characters together."""
        self._at_most("prompt", len(prompts), "max_prompts", "prompts")
        self._at_most("prompt", sum(len(p) for p in prompts if isinstance(p, str)), "max_prompt_chars", "characters")

    def check_messages(self, texts: list[str]) -> None:
        """The number of chat messages and their characters together."""
        self._at_most("messages", len(texts), "max_messages", "messages")
        self._at_most("messages", sum(map(len, texts)), "max_prompt_chars", "characters")

    def _at_most(self, param: str, value: int, limit_name: str, unit: str = "") -> None:
        limit = getattr(self, limit_name)
        if value > limit:
            bound = f"have at most {limit} {unit}" if unit else f"be at most {limit}"
            flag = "--" + limit_name.replace("_", "-")
            raise ParamError(param, f"{param} must {bound} on this server ({flag}), got {value}")


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One --max-... flag per limit, in a group of its own."""
    g = parser.add_argument_group("request limits (a request over one gets a 400 naming the field)")
    for f in fields(RequestLimits):
        g.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                       help=f"{_DOC[f.name][0]} (default {f.default})")


def limits_from_args(ns: argparse.Namespace) -> RequestLimits:
    """RequestLimits from parsed flags (defaults where a flag is absent from the namespace)."""
    return RequestLimits(**{f.name: getattr(ns, f.name, f.default) for f in fields(RequestLimits)})
