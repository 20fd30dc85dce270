"""`tune`'s search space and which configurations to try: a coarse pass, then refinement at the frontier.

The default space holds the knobs that matter on the model at hand, the base (engine default) first:
  quantization            for a GGUF file its own blocks first ("gguf", the fastest format here), then the
                          dequantized model (None), int8 and int4; for an HF checkpoint None, int8, int4
  speculative             off, ngram
  max_num_seqs            64, 16, 4            requests in a batch
  max_num_batched_tokens  512, 128, 2048       tokens a step may take (the chunked-prefill budget)
  threads                 all torch threads, half of them (when there are two or more)
  tensor_parallel_size    1, 2 (when there are two threads or more and the model splits in two)
Coarse: the base, then each axis varied alone. Refine: the per-axis winners combined, then the neighbours of
the chosen configuration and of those it ties with (adjacent values; for numeric axes also the rounded
geometric midpoint while neighbours are twice apart or more), until nothing new is left.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from tuneserve.bench.points import config_id


def default_space(model: str) -> dict[str, list[Any]]:
    """The default search space for a model (base values first)."""
    import torch

    from tuneserve.weights import open_checkpoint
    from tuneserve.weights.sources import resolve

    path = resolve(model)
    threads = torch.get_num_threads()
    splits = threads >= 2 and open_checkpoint(path).arch_config().tensor_parallel_problem(2) is None
    return {"quantization": (["gguf", None] if str(path).endswith(".gguf") else [None]) + ["int8", "int4"],
            "speculative": ["off", "ngram"],
            "max_num_seqs": [64, 16, 4],
            "max_num_batched_tokens": [512, 128, 2048],
            "threads": [threads] + ([threads // 2] if threads >= 2 else []),
            "tensor_parallel_size": [1] + ([2] if splits else [])}


def parse_space(text: str) -> dict[str, list[Any]]:
    """--space JSON {axis: [values]} (a single value: fixed for every configuration)."""
    try:
        space = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--space must be JSON like {{\"max_num_seqs\": [16, 64]}}: {e}") from None
    if not isinstance(space, dict) or not space:
        raise ValueError("--space must be a non-empty JSON object {axis: [values]}")
    return {k.replace("-", "_"): (v if isinstance(v, list) else [v]) for k, v in space.items()}


def base_config(space: dict[str, list[Any]]) -> dict[str, Any]:
    return {k: v[0] for k, v in space.items()}


def coarse(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The base configuration, then every other value of each axis with the rest at the base."""
    base = base_config(space)
    out = [base]
    for axis, values in space.items():
        out += [{**base, axis: v} for v in values[1:]]
    return out


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def neighbours(space: dict[str, list[Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Configurations one step from `config` on one axis."""
    out = []
    for axis, values in space.items():
        v = config.get(axis)
        if len(values) < 2:
            continue
        if _numeric(values) and isinstance(v, int):
            ladder = sorted(set(values) | {v})
            i = ladder.index(v)
            near = [ladder[j] for j in (i - 1, i + 1) if 0 <= j < len(ladder)]
            mids = [round(math.sqrt(v * w)) for w in near if max(v, w) >= 2 * min(v, w)]
            out += [{**config, axis: w} for w in near + mids if w != v]
        else:
            out += [{**config, axis: w} for w in values if w != v]
    return out


def refine(space: dict[str, list[Any]], measured: list[dict[str, Any]],
           choose: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The next configurations to try, none of them measured yet. `choose(configs)` returns the chosen
    configuration among measured ones and those it ties with (chosen first; [] when none qualifies)."""
    base = base_config(space)
    winners = {}
    for axis in space:
        subset = [c for c in measured if all(c.get(k) == base[k] for k in space if k != axis)]
        top = choose(subset)
        if top:
            winners[axis] = top[0].get(axis, base[axis])
    out = [{**base, **winners}]
    for c in choose(measured):
        out += neighbours(space, c)
    seen = {config_id(c) for c in measured}
    fresh = []
    for c in out:
        if config_id(c) not in seen:
            seen.add(config_id(c))
            fresh.append(c)
    return fresh
