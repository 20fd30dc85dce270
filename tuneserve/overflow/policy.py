"""Overflow policies: what to do with a prompt that does not fit the context with its max_tokens.

  error            reject it, stating the context length, the prompt length and max_tokens (the default)
  truncate-left    drop the oldest tokens
  truncate-middle  keep the head and the tail, drop the middle
  summarize        replace the middle by a short summary the model writes first (engine/llm_engine.py runs it)
Whatever is done is reported in the request's output metadata, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass


def default_reserve(limit: int) -> int:
    """Output tokens kept free when max_tokens is omitted and the prompt alone fills the context."""
    return max(1, min(256, limit // 8))


@dataclass
class FitPlan:
    """How a prompt fits: the ids to run (head + tail for summarize), max_tokens, and the metadata."""

    ids: list[int]
    max_tokens: int
    metadata: dict
    middle: list[int] | None = None  # summarize: the tokens to condense, to go between head and tail
    head_len: int = 0


def fit_prompt(ids: list[int], max_tokens: int | None, limit: int, policy: str) -> FitPlan:
    """Apply an overflow policy; raises ValueError for `error` or when nothing can fit."""
    n = len(ids)
    if not ids:
        raise ValueError("the prompt is empty; give at least one token")
    if max_tokens is None:
        if n < limit:
            return FitPlan(ids, limit - n, {})
        max_tokens = default_reserve(limit)
    elif n + max_tokens <= limit:
        return FitPlan(ids, max_tokens, {})
    keep = limit - max_tokens
    if policy == "error" or keep < 2:
        raise ValueError(f"this model's context length is {limit} tokens, but the prompt has {n} tokens and "
                         f"max_tokens is {max_tokens} ({n + max_tokens} in all); shorten the prompt or lower "
                         f"max_tokens" + ("" if policy == "error" else " (max_tokens alone leaves no room)")
                         + ("; or set overflow_policy to truncate-left, truncate-middle or summarize"
                            if policy == "error" else ""))
    meta = {"overflow_policy": policy, "original_prompt_tokens": n, "removed_tokens": n - keep}
    if policy == "truncate-left":
        return FitPlan(ids[n - keep:], max_tokens, {**meta, "prompt_tokens": keep})
    head = keep // 2
    tail = keep - head
    meta["removed_range"] = [head, n - tail]
    if policy == "truncate-middle":
        return FitPlan(ids[:head] + ids[n - tail:], max_tokens, {**meta, "prompt_tokens": keep})
    if policy == "summarize":
        return FitPlan(ids[:head] + ids[n - tail:], max_tokens, meta, middle=ids[head:n - tail], head_len=head)
    raise ValueError(f"unknown overflow_policy {policy!r}")
