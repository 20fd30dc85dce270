"""Serving-benchmark workloads: seeded prompt datasets, arrival schedules and a concurrency limit.

Everything here is pure and seeded except `ConcurrencyLimit`, a semaphore that also counts the most
requests it ever let in at once. Prompts are token-id lists; the client decides how to send them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
from dataclasses import dataclass
from typing import Any

RANDOM_ID_RANGE = (1000, 20000)  # token ids of the random dataset: [low, high), inside any modern vocabulary


@dataclass
class BenchRequest:
    """One request of a workload: the prompt's token ids and how many tokens to generate."""

    prompt: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def random_requests(n: int, input_len: int, output_len: int, seed: int = 0,
                    id_range: tuple[int, int] = RANDOM_ID_RANGE) -> list[BenchRequest]:
    """n prompts of input_len token ids drawn uniformly from [id_range[0], id_range[1])."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len}, {output_len}")
    low, high = id_range
    if not 0 <= low < high:
        raise ValueError(f"id_range must satisfy 0 <= low < high, got {id_range}")
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(low, high) for _ in range(input_len)], output_len) for _ in range(n)]


def corpus_requests(tokenizer: Any, corpus_text: str, n: int, min_input: int, max_input: int, output_len: int,
                    seed: int = 0) -> list[BenchRequest]:
    """n prompts cut from a text corpus, lengths uniform in [min_input, max_input] tokens."""
    from tuneserve.corpus import sample_prompts

    prompts = sample_prompts(tokenizer, corpus_text, n, min_input, max_input, seed)
    return [BenchRequest(p, output_len) for p in prompts]


def shared_prefix_requests(tokenizer: Any, corpus_text: str, n: int, prefix_len: int, suffix_len: int,
                           output_len: int, seed: int = 0) -> list[BenchRequest]:
    """n prompts = one common prefix_len-token "system prompt" + a distinct suffix_len-token question each."""
    from tuneserve.corpus import sample_prompts

    (prefix,) = sample_prompts(tokenizer, corpus_text, 1, prefix_len, prefix_len, seed)
    suffixes = sample_prompts(tokenizer, corpus_text, n, suffix_len, suffix_len, seed + 1)
    return [BenchRequest(prefix + s, output_len) for s in suffixes]


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets (seconds from the start) of n requests at `rate` requests/s.

    Gaps are gamma-distributed with shape=burstiness and mean 1/rate (burstiness 1 is a Poisson process;
    below 1 burstier, above 1 more regular: the gaps' squared coefficient of variation is 1/burstiness).
    An infinite rate sends everything at t=0. The first request goes at t=0, the next after one gap (as vLLM).
    """
    if rate <= 0 or math.isnan(rate):
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)  # mean = shape * scale = 1 / rate
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if burstiness == 1.0 else rng.gammavariate(burstiness, scale)
    return out


def fingerprint(requests: list[BenchRequest]) -> str:
    """A short sha256 of the prompts and output lengths, to check that two runs used the same workload."""
    blob = json.dumps([[r.prompt, r.output_len] for r in requests], separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ConcurrencyLimit:
    """At most `limit` requests in flight (None: no limit); remembers the peak it allowed."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"max concurrency must be >= 1, got {limit}")
        self.limit = limit
        self._sem = asyncio.Semaphore(limit) if limit is not None else None
        self.in_flight = 0
        self.peak = 0

    async def __aenter__(self) -> ConcurrencyLimit:
        if self._sem is not None:
            await self._sem.acquire()
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.in_flight -= 1
        if self._sem is not None:
            self._sem.release()
