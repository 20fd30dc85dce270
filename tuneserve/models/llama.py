"""The llama family: Llama (1-3.x; rope scaling in models/rope.py), SmolLM2, Mistral (a sliding window on
every layer), Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMS norm, explicit head_dim). What differs is in
ArchConfig, read and checked by weights/.

Reads top to bottom like nanoGPT: embed -> N x (norm, attention, residual, norm, MLP, residual) -> norm.
The forward pass runs on a flat ragged batch of tokens (N, hidden); logits are computed only for the
rows that need them.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.kernels.config import KernelConfig
from tuneserve.kernels.dense_ops import DenseLinear, linear
from tuneserve.models.fused_decode import FusedDecode
from tuneserve.models.layers import Attention, ForwardContext, GatedMLP, RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch, layer)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = self.make_mlp(arch)

    @staticmethod
    def make_mlp(arch: ArchConfig) -> nn.Module:
        return GatedMLP(arch.hidden_size, arch.intermediate_size, arch.hidden_act)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer with RMSNorm, rotary attention and a SwiGLU MLP."""

    layer_cls = DecoderLayer
    # layer_cls's norms for the fused decode step: before attention, on its output, before the MLP, on its output
    fused_norms: tuple[str, str | None, str, str | None] = ("input_layernorm", None, "post_attention_layernorm", None)

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.dense_compiled: bool | None = None  # the tied head's kernel choice, bound at load (bind_kernels)
        self.fused: FusedDecode | None = None  # the decode steps' one-call path, bound at load (bind_kernels)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else DenseLinear(arch.hidden_size, arch.vocab_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: (N,) -> final hidden states (N, hidden)."""
        x = self.embed(input_ids)
        if self.fused is not None and self.fused.takes(x, ctx):
            y = self.fused.run(x, ctx)
            return y if self.fused.final_norm is not None else self.norm(y)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def bind_kernels(self, config: KernelConfig) -> None:
        """An unquantized head (tied or not) follows the dense kernel choice like every linear layer; decode
        steps run fused where the configuration asks for it and every layer qualifies (models/fused_decode.py)."""
        self.dense_compiled = config.dense == "compiled"
        self.fused = FusedDecode(self, self.layer_cls, self.fused_norms) if config.decode == "fused" else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (R, hidden) -> fp32 logits (R, vocab), soft-capped where the arch says (gemma2)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if not isinstance(head, (nn.Embedding, nn.Linear)):
            logits = head.logits(hidden)  # a quantized head (tied: the packed embedding itself)
        else:
            logits = linear(hidden, head.weight, compiled=self.dense_compiled).float()
        cap = self.arch.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    # ----- weights --------------------------------------------------------------------------
    def _fused_slices(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint parameter suffix -> (our fused parameter suffix, row offset, rows)."""
        a = self.arch
        q, kv, inter = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.intermediate_size
        out = {}
        for kind in ("weight", "bias"):
            out[f"self_attn.q_proj.{kind}"] = (f"self_attn.qkv_proj.{kind}", 0, q)
            out[f"self_attn.k_proj.{kind}"] = (f"self_attn.qkv_proj.{kind}", q, kv)
            out[f"self_attn.v_proj.{kind}"] = (f"self_attn.qkv_proj.{kind}", q + kv, kv)
        out["mlp.gate_proj.weight"] = ("mlp.gate_up_proj.weight", 0, inter)
        out["mlp.up_proj.weight"] = ("mlp.gate_up_proj.weight", inter, inter)
        return out

    def load_weights(self, weights: Iterable[tuple[str, np.ndarray | torch.Tensor]],
                     elsewhere: frozenset[str] = frozenset()) -> None:
        """Copy checkpoint tensors (HF names) into our parameters, fusing q/k/v and gate/up; the parameters
        in `elsewhere` are filled by someone else (GGUF blocks served natively) and may be missing."""
        params = dict(self.named_parameters())
        fused = self._fused_slices()
        loaded: set[str] = set()
        for name, w in weights:
            t = torch.from_numpy(w if w.flags.writeable else w.copy()) if isinstance(w, np.ndarray) else w
            name = name.removeprefix("model.")
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                if rest in fused:
                    target, off, rows = fused[rest]
                    key = f"layers.{idx}.{target}"
                    params[key].data[off:off + rows].copy_(t)
                    loaded.add(f"{key}:{off}")
                    continue
            key = name if name in params else None
            if key is None:
                if name in ("lm_head.weight",) and self.lm_head is None:
                    continue
                if "rotary_emb" in name:
                    continue
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            if tuple(params[key].shape) != tuple(t.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model {tuple(params[key].shape)}")
            params[key].data.copy_(t)
            loaded.add(key)
        self._check_loaded({k: v for k, v in params.items() if k not in elsewhere}, fused, loaded)

    def _check_loaded(self, params: dict, fused: dict, loaded: set[str]) -> None:
        missing = []
        fused_targets = {(t, off) for t, off, _ in fused.values()}
        for key in params:
            if "qkv_proj" in key or "gate_up_proj" in key:
                idx = key.split(".")[1]
                suffix = key.split(".", 2)[2]
                offs = {off for t, off in fused_targets if t == suffix}
                if any(f"layers.{idx}.{suffix}:{o}" not in loaded for o in offs):
                    missing.append(key)
            elif key not in loaded:
                missing.append(key)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:4]}")
