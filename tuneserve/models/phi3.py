"""Phi-3 (and Phi-3.5 / Phi-4-mini, which keep its class): llama's layer and math; the checkpoint fuses
q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (gate rows first, as in our own fused
projections; GGUF `attn_qkv` and `ffn_up` are laid out the same). What else differs is in ArchConfig:
longrope scaling, partial rotary (rotary_dim), a sliding window on every layer where the config has one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from tuneserve.models.llama import LlamaForCausalLM

Weights = Iterable[tuple[str, np.ndarray | torch.Tensor]]


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Weights, elsewhere: frozenset[str] = frozenset()) -> None:
        """As llama, with the fused checkpoint tensors split into the parts llama's loader fuses again."""
        return super().load_weights(self._split_fused(weights), elsewhere)

    def _split_fused(self, weights: Weights) -> Iterator[tuple[str, np.ndarray | torch.Tensor]]:
        a = self.arch
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        parts = {"self_attn.qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
                 "mlp.gate_up_proj": (("gate_proj", inter), ("up_proj", inter))}
        for name, w in weights:
            base, _, kind = name.rpartition(".")
            module = next((m for m in parts if base.endswith(m)), None)
            if module is None:
                yield name, w
                continue
            rows = sum(n for _, n in parts[module])
            if w.shape[0] != rows:
                raise ValueError(f"{name}: checkpoint has {w.shape[0]} rows, the model {rows}")
            prefix, off = base[:-len(module.rpartition(".")[2])], 0
            for part, n in parts[module]:
                yield f"{prefix}{part}.{kind}", w[off:off + n]
                off += n
