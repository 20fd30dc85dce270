"""The soak's request mix: seeded, varied bodies for both generation endpoints and how each client behaves.

Prompts are a few shared "system" prefixes (long enough to span several KV blocks, so the prefix cache is
hit and shared blocks are freed by many owners) plus random-length suffixes; some suffixes repeat a phrase
so that n-gram speculation drafts and gets accepted. Bodies mix greedy and sampled requests, n > 1 and,
for completions, two prompts in one request. Each job also says how its client behaves: read to the end,
hang up after a few chunks, cancel before the first chunk, or wait for a non-streamed answer (or give up).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Plain words for prompts when no corpus is given: enough variety for distinct prompts, no network needed.
WORDS = tuple("""the a of and to in is was for on with as by at from that this it be are not or an which have
has had were their they there been one all would can will more when who what about into time some could than
its only other new also after first two over such years most many may these where well between both each
river city music paper garden engine bridge winter market planet language ocean forest station window
letter signal mountain island harbor teacher doctor farmer painter sailor captain student library museum
kitchen theater village castle temple desert valley canyon glacier volcano meadow orchard lantern compass
quickly slowly carefully quietly brightly warmly gently suddenly finally rarely often always never
red green blue yellow silver golden ancient modern small large bright dark quiet loud warm cold""".split())

MODES = ("stream", "disconnect", "abort", "json", "json-abort")
MODE_WEIGHTS = (40, 20, 10, 25, 5)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass
class Job:
    """One request of the soak: where it goes, its body, and what its client does."""

    path: str
    body: dict
    mode: str  # one of MODES
    stop_after: int | None = None  # disconnect: hang up after this many chunks (abort: 0, at the headers)
    abort_after_s: float | None = None  # abort / json-abort: cancel after this long

    @property
    def greedy(self) -> bool:
        return self.body.get("temperature") == 0

    @property
    def num_choices(self) -> int:
        prompt = self.body.get("prompt")
        prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else 1
        return self.body.get("n", 1) * prompts


class Workload:
    """Draws jobs from a seeded mix; `corpus_text` (optional) supplies natural text instead of WORDS."""

    def __init__(self, model: str, seed: int = 0, max_tokens: int = 32, max_n: int = 3,
                 corpus_text: str | None = None, num_prefixes: int = 3) -> None:
        if max_tokens < 1 or max_n < 1:
            raise ValueError(f"max_tokens and max_n must be >= 1, got {max_tokens}, {max_n}")
        self.model, self.max_tokens, self.max_n = model, max_tokens, max_n
        self.words = tuple(corpus_text.split()) if corpus_text else WORDS
        if len(self.words) < 200 and corpus_text:
            raise ValueError(f"the corpus has {len(self.words)} words; the soak needs at least 200")
        rng = random.Random(seed)
        self.prefixes = [self.text(rng, rng.randint(60, 120)) for _ in range(num_prefixes)]

    def text(self, rng: random.Random, n_words: int) -> str:
        """n_words of text: a random window of the corpus, or random words."""
        if self.words is WORDS:
            return " ".join(rng.choice(WORDS) for _ in range(n_words))
        start = rng.randrange(max(1, len(self.words) - n_words))
        return " ".join(self.words[start:start + n_words])

    def suffix(self, rng: random.Random) -> str:
        """A random-length question; one in four asks to repeat a phrase (what n-gram drafts predict)."""
        if rng.random() < 0.25:
            phrase = self.text(rng, rng.randint(3, 8))
            return f"Repeat this line three times: {phrase}. {phrase}. {phrase}."
        return self.text(rng, rng.randint(1, 40))

    def prompt(self, rng: random.Random) -> tuple[str | None, str]:
        """(shared prefix or None, suffix): 85% of prompts start with one of the shared prefixes."""
        prefix = rng.choice(self.prefixes) if rng.random() < 0.85 else None
        return prefix, self.suffix(rng)

    def sampling(self, rng: random.Random, greedy: bool | None = None) -> dict:
        """Half greedy (or as `greedy` says), half sampled (half of those seeded); n, max_tokens, ignore_eos vary."""
        n = rng.choices((1, 2, 3), weights=(70, 20, 10))[0]
        body: dict = {"model": self.model, "n": min(n, self.max_n), "max_tokens": rng.randint(1, self.max_tokens),
                      "ignore_eos": rng.random() < 0.5}
        coin = rng.random() < 0.5
        if greedy if greedy is not None else coin:
            body["temperature"] = 0
        else:
            body.update(temperature=round(rng.uniform(0.5, 1.2), 2), top_p=0.9)
            if rng.random() < 0.5:
                body["seed"] = rng.randrange(1 << 30)
        return body

    def body(self, rng: random.Random, greedy: bool | None = None) -> tuple[str, dict]:
        """(path, body) of one request, without the streaming fields."""
        body = self.sampling(rng, greedy)
        prefix, suffix = self.prompt(rng)
        if rng.random() < 0.4:
            system = prefix or "You are a helpful assistant."
            body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": suffix}]
            return CHAT, body
        join = (lambda s: f"{prefix}\n\n{s}") if prefix else (lambda s: s)
        if rng.random() < 0.1:  # two prompts in one request: n x 2 sequences
            body["prompt"] = [join(suffix), join(self.suffix(rng))]
        else:
            body["prompt"] = join(suffix)
        return COMPLETIONS, body

    def draw(self, rng: random.Random, mode: str | None = None, greedy: bool | None = None) -> Job:
        """The next job: a body and a client behaviour (random, unless mode or greedy are given)."""
        path, body = self.body(rng, greedy)
        drawn = rng.choices(MODES, weights=MODE_WEIGHTS)[0]
        mode = mode or drawn
        job = Job(path, body, mode)
        if mode in ("stream", "disconnect", "abort"):
            body["stream"] = True
            if rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        if mode == "disconnect":
            job.stop_after = rng.randint(1, 6)
        elif mode == "abort":  # cancel after a few ms, or at the response headers if they come first
            job.stop_after, job.abort_after_s = 0, rng.uniform(0.0, 0.05)
        elif mode == "json-abort":
            job.abort_after_s = rng.uniform(0.05, 1.0)
        return job
