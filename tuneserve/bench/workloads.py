"""The prompt sets the benchmarks run: corpus cuts, fixed-batch ladders, grounded and open-ended chats.

Every workload is a list of prompts given as token-id lists and a fixed number of new tokens per request
(greedy, EOS ignored), so the engine, the sweep and the peers measure the very same requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from tuneserve.corpus import load_corpus, sample_prompts

WORKLOADS = ("corpus", "random", "shared-prefix", "grounded")
GROUNDED_TASKS = [
    "Copy the following text exactly, word for word:\n\n{passage}",
    "Repeat the text below, but replace every occurrence of the word \"the\" with \"THE\":\n\n{passage}",
    "Quote the first three sentences of this text verbatim:\n\n{passage}",
    "Here is some code. Rewrite it unchanged, adding nothing:\n\n{passage}",
]
OPEN_TASKS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten-year-old.",
    "Describe a walk through a busy market in a city you imagine.",
    "Write a letter from a cat to its owner about breakfast.",
    "What are the pros and cons of living near the sea?",
    "Invent a new board game and explain its rules.",
]


@dataclass
class Workload:
    prompts: list[list[int]]
    output_len: int
    name: str

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def corpus_workload(tokenizer, corpus: str, n: int, min_in: int, max_in: int, output_len: int,  # noqa: ANN001
                    seed: int = 0) -> Workload:
    """n prompts cut from a corpus, uniform lengths in [min_in, max_in]."""
    prompts = sample_prompts(tokenizer, load_corpus(corpus), n, min_in, max_in, seed)
    return Workload(prompts, output_len, f"{corpus}:{n}x[{min_in},{max_in}]->{output_len}")


def ladder_workload(tokenizer, batch: int, prompt_len: int = 64, output_len: int = 64) -> Workload:  # noqa: ANN001
    """`batch` copies of one fixed prompt shape (distinct prompts, so prefix caching does not help)."""
    prompts = sample_prompts(tokenizer, load_corpus("wikipedia"), batch, prompt_len, prompt_len, seed=batch)
    return Workload(prompts, output_len, f"ladder:{batch}x{prompt_len}->{output_len}")


def grounded_prompts(tokenizer, n: int, passage_tokens: int = 160, seed: int = 0) -> list[list[int]]:  # noqa: ANN001
    """n chat prompts asking to quote or edit a passage cut from Wikipedia or the Python docs."""
    rng = random.Random(seed)
    sources = [load_corpus("wikipedia"), load_corpus("python-docs")]
    out = []
    for i in range(n):
        text = sources[i % 2]
        (ids,) = sample_prompts(tokenizer, text, 1, passage_tokens, passage_tokens, seed=seed * 1000 + i)
        task = GROUNDED_TASKS[3 if i % 2 else rng.randrange(3)]
        out.append(_as_prompt(tokenizer, task.format(passage=tokenizer.decode(ids))))
    return out


def open_prompts(tokenizer, n: int) -> list[list[int]]:  # noqa: ANN001
    """n open-ended chat prompts."""
    return [_as_prompt(tokenizer, OPEN_TASKS[i % len(OPEN_TASKS)] + f" (Version {i})") for i in range(n)]


def _as_prompt(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    from tuneserve.tokenizer import chat_prompt

    if getattr(tokenizer, "chat_template", None):
        return chat_prompt(tokenizer, [{"role": "user", "content": text}])
    return tokenizer(text).input_ids


def build_workload(tokenizer, workload: str, num_prompts: int, output_len: int,  # noqa: ANN001
                   seed: int = 0) -> Workload:
    """Prompts (token ids) of a named workload (one of WORKLOADS)."""
    if workload == "corpus":
        return corpus_workload(tokenizer, "wikipedia", num_prompts, 64, 512, output_len, seed)
    if workload == "random":
        rng = random.Random(seed)
        hi = min(20000, len(tokenizer))
        prompts = [[rng.randrange(hi // 20, hi) for _ in range(rng.randint(64, 512))] for _ in range(num_prompts)]
        return Workload(prompts, output_len, f"random:{num_prompts}")
    if workload == "shared-prefix":
        (system,) = sample_prompts(tokenizer, load_corpus("wikipedia"), 1, 512, 512, seed)
        tails = sample_prompts(tokenizer, load_corpus("news"), num_prompts, 16, 64, seed)
        return Workload([system + t for t in tails], output_len, f"shared-prefix:{num_prompts}x512+16..64")
    if workload == "grounded":
        return Workload(grounded_prompts(tokenizer, num_prompts, seed=seed), output_len, f"grounded:{num_prompts}")
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


# A 20-property schema whose every field is bounded, so a constrained answer always ends.
DEMO_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "properties": {
        **{f"name_{i}": {"type": "string", "maxLength": 12} for i in range(5)},
        **{f"count_{i}": {"type": "integer", "minimum": 0, "maximum": 999} for i in range(5)},
        **{f"flag_{i}": {"type": "boolean"} for i in range(5)},
        **{f"kind_{i}": {"enum": ["alpha", "beta", "gamma"]} for i in range(5)},
    },
}
DEMO_SCHEMA["required"] = list(DEMO_SCHEMA["properties"])


def schema_of(name: str) -> dict:
    """A JSON schema from a file, or DEMO_SCHEMA for 'demo'."""
    if name == "demo":
        return DEMO_SCHEMA
    with open(name, encoding="utf-8") as f:
        return json.load(f)
