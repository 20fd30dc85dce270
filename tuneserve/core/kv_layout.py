"""The KV layout: layers grouped by attention window (`KVGroupSpec`), and how a memory budget splits
into blocks per group. Torch-free: the runner allocates the tensors (worker/kv_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneserve.config import EngineConfig
from tuneserve.core.window import Window


@dataclass(frozen=True)
class KVGroupSpec:
    """Layers sharing block tables. window 0 = full attention."""

    layers: tuple[int, ...]
    window: int = 0
    num_sink_tokens: int = 0  # tokens at the start a windowed group keeps (StreamingLLM sinks)
    attn_window: Window = field(init=False, repr=False, compare=False)  # the rule built from the two above

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn_window", Window(self.window, self.num_sink_tokens))

    def max_blocks_per_request(self, num_tokens: int, block_size: int, max_step_tokens: int) -> int:
        """Most blocks a request of num_tokens holds at once when a step computes <= max_step_tokens of it."""
        return self.attn_window.max_blocks(num_tokens, block_size, max_step_tokens)


def split_kv_blocks(groups: list[KVGroupSpec], block_bytes: list[int], memory: int, block_size: int,
                    max_num_seqs: int, max_step_tokens: int) -> list[int]:
    """Blocks per group (null block included) out of `memory` bytes.

    A windowed group never needs more than max_num_seqs requests' worth of in-window blocks plus one
    step's new tokens (and the null block); it gets that much, or as many as the full groups when memory
    is short. Full-attention groups share the rest equally. Without a full group, all groups share evenly.
    """
    caps: list[int | None] = []
    for spec in groups:
        if not spec.window:
            caps.append(None)
            continue
        per_seq = spec.attn_window.blocks_per_seq(block_size)
        caps.append(max_num_seqs * per_seq + -(-max_step_tokens // block_size) + 1)
    if all(c is not None for c in caps):
        caps = [None] * len(groups)
    fixed: dict[int, int] = {}
    while True:  # water-filling: cap the windowed groups that need less than an equal share
        free = [g for g in range(len(groups)) if g not in fixed]
        left = memory - sum(n * block_bytes[g] for g, n in fixed.items())
        equal = max(0, left) // sum(block_bytes[g] for g in free)
        newly = [g for g in free if caps[g] is not None and caps[g] < equal]
        if not newly:
            return [fixed.get(g, equal) for g in range(len(groups))]
        fixed.update((g, caps[g]) for g in newly)


def kv_groups(config: EngineConfig) -> list[KVGroupSpec]:
    """Layers grouped by attention window: one KV group per distinct (window, sinks).

    A model's own windows (Gemma 3) come without sinks; an imposed `sliding_window` applies to the
    full-attention layers, with `num_sink_tokens` sinks, in a group of its own."""
    arch, cache = config.model.arch, config.cache
    imposed = (cache.sliding_window, cache.num_sink_tokens) if cache.sliding_window else (0, 0)
    by_kind: dict[tuple[int, int], list[int]] = {}
    for layer in range(arch.num_layers):
        native = arch.window_of(layer)
        by_kind.setdefault((native, 0) if native else imposed, []).append(layer)
    return [KVGroupSpec(tuple(layers), w, sinks) for (w, sinks), layers in sorted(by_kind.items())]
