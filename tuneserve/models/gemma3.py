"""Gemma 3 (text): interleaved sliding-window and global attention layers.

Differences from llama: embeddings scaled by sqrt(hidden); four norms per layer (before and after both
attention and MLP); per-head RMS norm on q and k; GELU-tanh MLP; attention scale 1/sqrt(query_pre_attn_scalar);
sliding layers use a 512-token window and rope base 1e4, global layers (every 6th) rope base 1e6.
Norm weights here already include Gemma's "+1" (GGUF stores them so; weights/safetensors.py adds it to
HF checkpoints' as it reads them).
"""

from __future__ import annotations

import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.models.layers import Attention, ForwardContext, GatedMLP, RMSNorm
from tuneserve.models.llama import LlamaForCausalLM


class Gemma3DecoderLayer(nn.Module):
    """Norms before and after both attention and MLP (Gemma 2 too, which lacks the q/k norms)."""

    qk_norm = True

    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        h, eps = arch.hidden_size, arch.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(arch, layer, qk_norm=self.qk_norm)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = GatedMLP(h, arch.intermediate_size, arch.hidden_act)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), ctx))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma3DecoderLayer
    fused_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.arch.hidden_size**0.5, dtype=x.dtype)
