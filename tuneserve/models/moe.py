"""Mixture of experts: Mixtral and Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B).

Each layer's MLP is a router and E gated MLPs ("experts"): every token goes through the top-k experts by
the router's softmax (fp32, as HF computes it), their outputs weighted by those probabilities (renormalized
to sum to 1 where the config says: Mixtral always, Qwen2-MoE per norm_topk_prob). Qwen2-MoE adds a shared
expert that every token takes, scaled by sigmoid(shared_expert_gate . x). The attention is llama's (Qwen2-MoE
with q/k/v biases, Mixtral with Mistral's optional window); the rest of the math is in ArchConfig.

Experts run one after another over the tokens routed to them (a gather, one GatedMLP, a weighted
scatter-add): on the CPU at small batches this does only the routed work. Each expert is a plain GatedMLP,
so quantization (quant/apply.py) and tensor parallelism (parallel/shard.py) treat it like any MLP.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.kernels.dense_ops import DenseLinear
from tuneserve.models.layers import GatedMLP
from tuneserve.models.llama import DecoderLayer, LlamaForCausalLM

Weights = Iterable[tuple[str, np.ndarray | torch.Tensor]]
# Mixtral's checkpoint names for an expert's projections -> llama's
_MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class SparseMoE(nn.Module):
    """Top-k routed experts, plus a gated shared expert where the arch has one."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        h = arch.hidden_size
        self.top_k, self.norm_topk = arch.num_experts_per_tok, arch.norm_topk_prob
        self.gate = DenseLinear(h, arch.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(GatedMLP(h, arch.moe_intermediate_size, arch.hidden_act)
                                     for _ in range(arch.num_experts))
        shared = arch.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(h, shared, arch.hidden_act) if shared else None
        self.shared_expert_gate = DenseLinear(h, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, hidden) -> (N, hidden)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # ascending, as HF adds them up
            tok, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, tok, self.experts[e](x[tok]) * weights[tok, slot, None])
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class MoEDecoderLayer(DecoderLayer):
    @staticmethod
    def make_mlp(arch: ArchConfig) -> nn.Module:
        return SparseMoE(arch)


class MoEForCausalLM(LlamaForCausalLM):
    layer_cls = MoEDecoderLayer

    def load_weights(self, weights: Weights, elsewhere: frozenset[str] = frozenset()) -> None:
        """As llama, with Mixtral's names (block_sparse_moe, w1/w3/w2) read as Qwen2-MoE's (mlp, gate/up/down)."""
        return super().load_weights(self._renamed(weights), elsewhere)

    @staticmethod
    def _renamed(weights: Weights) -> Iterator[tuple[str, np.ndarray | torch.Tensor]]:
        for name, w in weights:
            if ".block_sparse_moe." in name:
                name = name.replace(".block_sparse_moe.", ".mlp.")
                head, _, kind = name.rpartition(".")
                base, _, leaf = head.rpartition(".")
                name = f"{base}.{_MIXTRAL.get(leaf, leaf)}.{kind}"
            yield name, w

    def _fused_slices(self) -> dict[str, tuple[str, int, int]]:
        """Llama's attention slices, and gate/up of every expert (and the shared one) fused as llama's are."""
        a = self.arch
        out = {k: v for k, v in super()._fused_slices().items() if k.startswith("self_attn.")}
        mlps = [(f"mlp.experts.{e}", a.moe_intermediate_size) for e in range(a.num_experts)]
        if a.shared_expert_intermediate_size:
            mlps.append(("mlp.shared_expert", a.shared_expert_intermediate_size))
        for prefix, inter in mlps:
            out[f"{prefix}.gate_proj.weight"] = (f"{prefix}.gate_up_proj.weight", 0, inter)
            out[f"{prefix}.up_proj.weight"] = (f"{prefix}.gate_up_proj.weight", inter, inter)
        return out
