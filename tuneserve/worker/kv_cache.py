"""The paged KV cache: how many blocks a memory budget buys in each KV group, and the tensors.

One path for the target model and the draft model: block bytes come from the model's own dtype and
shape, and each model gets the budget it is given (the engine splits one budget between them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneserve.config import EngineConfig
from tuneserve.core.kv_layout import KVGroupSpec, split_kv_blocks
from tuneserve.dtypes import element_bytes, torch_dtype
from tuneserve.log import log


@dataclass
class KVCache:
    """Per layer, views (K, V) of shape (num_blocks, block_size, kv_heads, head_dim) into its group's tensor."""

    groups: list[KVGroupSpec]
    num_blocks: list[int]  # per group, the null block included
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    layer_group: list[int]  # the KV group of each layer


def token_bytes(config: EngineConfig, num_layers: int | None = None) -> int:
    """Bytes of K and V for one token across num_layers layers (default: all of them)."""
    a = config.model.arch
    layers = a.num_layers if num_layers is None else num_layers
    return 2 * a.num_kv_heads * a.head_dim * element_bytes(config.model.dtype) * layers


def block_bytes(config: EngineConfig, groups: list[KVGroupSpec]) -> list[int]:
    """Bytes of one KV block in each group (K and V of every layer of the group)."""
    return [token_bytes(config, len(g.layers)) * config.cache.block_size for g in groups]


def plan_blocks(config: EngineConfig, groups: list[KVGroupSpec], memory: int, label: str = "KV cache") -> list[int]:
    """Blocks per KV group out of `memory` bytes (kv_layout.split_kv_blocks); logs what they hold."""
    c = config
    bs = c.cache.block_size
    nbytes = block_bytes(config, groups)
    counts = split_kv_blocks(groups, nbytes, memory, bs, c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens)
    if min(counts) < 2:
        raise ValueError(f"kv_cache_memory_bytes ({memory}) cannot hold 2 blocks per KV group of the {label}; "
                         f"give at least {2 * sum(nbytes)}")
    parts = []
    for spec, n, b in zip(groups, counts, nbytes):
        sinks = f" + {spec.num_sink_tokens} sinks" if spec.num_sink_tokens else ""
        kind = f"window {spec.window}{sinks}" if spec.window else "full attention"
        parts.append(f"{len(spec.layers)} layers ({kind}): {n - 1} blocks, {b // bs:,} bytes/token, "
                     f"{n * b / 2**20:.0f} MiB")
    full = [n for spec, n in zip(groups, counts) if not spec.window]
    fits = f"fits {(min(full) - 1) * bs:,} tokens" if full else "each request's KV bounded by its window"
    log(f"{label} ({bs} tokens/block, {fits}): " + "; ".join(parts))
    return counts


def build_kv(config: EngineConfig, groups: list[KVGroupSpec], num_blocks: list[int],
             kv_heads: int | None = None) -> KVCache:
    """Allocate the cache tensors: one per group, zeroed (padded reads of never-written slots must be finite).
    `kv_heads`: the KV heads this cache holds (a tensor-parallel rank's share; default all)."""
    a = config.model.arch
    dtype, device = torch_dtype(config.model.dtype), torch.device(config.device)
    layers: list[tuple[torch.Tensor, torch.Tensor]] = [None] * a.num_layers  # type: ignore[list-item]
    layer_group = [0] * a.num_layers
    for g, spec in enumerate(groups):
        shape = (len(spec.layers), 2, num_blocks[g], config.cache.block_size, kv_heads or a.num_kv_heads, a.head_dim)
        cache = torch.zeros(shape, dtype=dtype, device=device)
        for j, layer in enumerate(spec.layers):
            layers[layer] = (cache[j, 0], cache[j, 1])
            layer_group[layer] = g
    return KVCache(list(groups), list(num_blocks), layers, layer_group)
