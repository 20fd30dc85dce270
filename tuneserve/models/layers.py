"""Building blocks shared by the model families: RMSNorm, rotary embedding, MLP, attention."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tuneserve.config import ArchConfig, RopeScaling
from tuneserve.kernels import quant_ops
from tuneserve.kernels.activation_ops import act_fp32, gated_act_bf16
from tuneserve.kernels.attention import MAX_HEAD_DIM, AttentionMetadata, paged_attention
from tuneserve.kernels.config import KernelConfig
from tuneserve.kernels.dense_ops import DenseLinear
from tuneserve.models.rope import rope_frequencies


@dataclass
class ForwardContext:
    """Per-step state every layer reads: positions, attention metadata, KV caches, rope tables."""

    positions: torch.Tensor  # (N,) long
    attn: list[AttentionMetadata]  # per layer (layers of one KV group share one object)
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V as (num_blocks, block_size, Hkv, D)
    rope_tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # by Rotary.key


class RMSNorm(nn.Module):
    """y = x / rms(x) * w (gemma's +1 is already folded into w by the checkpoints we read)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotate-half rotary embedding; cos/sin for a step's positions are computed once, shared by layers.

    Frequencies and the attention factor (folded into cos/sin) come from models/rope.py. With `rot_dim`
    below head_dim (partial rotary, phi3) only each head's first rot_dim dims rotate, the rest pass."""

    def __init__(self, head_dim: int, theta: float, max_pos: int, scaling: RopeScaling | None = None,
                 served_len: int = 0, rot_dim: int = 0) -> None:
        super().__init__()
        self.rot_dim, self.theta, self.max_pos = rot_dim or head_dim, theta, max_pos
        self.scaling, self.served_len = scaling or RopeScaling(), served_len or max_pos
        # layers with equal tables share one per step
        self.key = hash((theta, self.scaling, self.served_len, self.rot_dim))
        self.register_buffer("cos", torch.empty(max_pos, self.rot_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_pos, self.rot_dim // 2), persistent=False)
        if not self.cos.is_meta:
            self.init_tables()

    def init_tables(self) -> None:
        """Fill the cos/sin tables (again after the module moved off the meta device)."""
        inv_freq, att = rope_frequencies(self.rot_dim, self.theta, self.scaling, self.served_len)
        angles = torch.outer(torch.arange(self.max_pos, dtype=torch.float64), inv_freq)  # (max_pos, D/2)
        self.cos = (angles.cos() * att).float().to(self.cos.device)
        self.sin = (angles.sin() * att).float().to(self.sin.device)

    def tables(self, ctx: ForwardContext, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = ctx.rope_tables.get(self.key)
        if t is None:
            p = ctx.positions
            cos, sin = self.cos[p].unsqueeze(1).to(dtype), self.sin[p].unsqueeze(1).to(dtype)  # (N, 1, D/2)
            t = ctx.rope_tables[self.key] = (cos, sin)
        return t

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (N, H, D) -> rotated (N, H, D)."""
        cos, sin = self.tables(ctx, x.dtype)
        x1, x2 = x[..., :self.rot_dim].chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out if self.rot_dim == x.shape[-1] else torch.cat((out, x[..., self.rot_dim:]), dim=-1)


def _bf16_tile_rows(proj: nn.Module) -> int | None:
    """From how many rows a projection multiplies bf16 tiles (quantized layers say; None: never, or dense)."""
    return getattr(proj, "bf16_tile_rows", lambda: None)()


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden: int, inter: int, act: str = "silu") -> None:
        super().__init__()
        self.gate_up_proj = DenseLinear(hidden, 2 * inter, bias=False)
        self.down_proj = DenseLinear(inter, hidden, bias=False)
        self.inter = inter
        if act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act {act!r} is not supported (silu, gelu_tanh)")
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.dim() == 2 and self.bf16_between(x.shape[0]):
            h = gated_act_bf16(self.gate_up_proj.tile_sums(x.to(torch.bfloat16)), self.inter, self.act)
            return self.down_proj.tile_sums(h).float()
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(act_fp32(gate, self.act) * up)

    def bf16_between(self, rows: int) -> bool:
        """Whether a step of this many rows keeps the MLP's activations bf16 between its matmuls: where both
        multiply bf16 tiles, which round x and down's input to bf16 anyway, so the same values skip the fp32
        conversions, and act(gate) * up is one fused pass (kernels/activation_ops.py). The matmuls' sums come
        as the tiles' GEMM gives them: fp32 on AMX (not rounded: the same values as the fp32 MLP), bf16 from
        torch's GEMM.
        Qwen2.5-Coder's MLP at 512 rows: 47.9 -> 35.3 ms, the two GEMMs alone 32.9 (Xeon with AMX, 2 threads,
        torch's GEMM). With bf16 sums on AMX too, SmolLM2's top-1 against fp32 was 98.9%; with fp32 sums 99.2%."""
        if rows < quant_ops.LARGE_M:  # no tiles below this: skip the lookups in decode steps
            return False
        tiles_from = [_bf16_tile_rows(self.gate_up_proj), _bf16_tile_rows(self.down_proj)]
        return None not in tiles_from and rows >= max(tiles_from)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads over the paged KV cache; q/k/v fused in one matmul."""

    def __init__(self, arch: ArchConfig, layer: int, qk_norm: bool | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.h, self.hkv, self.d = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.window = arch.window_of(layer)
        self.q_size, self.kv_size = self.h * self.d, self.hkv * self.d
        self.qkv_proj = DenseLinear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.attention_bias)
        self.o_proj = DenseLinear(self.q_size, arch.hidden_size, bias=arch.attention_out_bias)
        if self.window and arch.rope_theta_local:  # gemma3's sliding layers: their own base, never scaled
            self.rotary = Rotary(self.d, arch.rope_theta_local, arch.max_position_embeddings)
        else:
            self.rotary = Rotary(self.d, arch.rope_theta, arch.max_position_embeddings, arch.rope_scaling,
                                 arch.served_len, arch.rotary_dim)
        scalar = arch.query_pre_attn_scalar or self.d
        self.scale = 1.0 / math.sqrt(scalar)
        qk_norm = arch.qk_norm if qk_norm is None else qk_norm
        self.q_norm = RMSNorm(self.d, arch.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.d, arch.rms_norm_eps) if qk_norm else None
        self.softcap = arch.attn_logit_softcapping  # 0: none
        self.compiled_attention: bool | None = None  # bound at load (bind_kernels); None: where built
        self.prompt_attention = "auto"  # bound at load: KernelConfig.prompt_attention
        self.qkv_biased = arch.attention_bias

    def bind_kernels(self, config: KernelConfig) -> None:
        """Take config's attention choices; the kernel takes head sizes up to MAX_HEAD_DIM and no softcap (a
        softcapped layer attends on the portable torch path, kernels/attention.py)."""
        self.compiled_attention = config.attention == "compiled" and self.d <= MAX_HEAD_DIM and not self.softcap
        self.prompt_attention = config.prompt_attention

    def prompt_bf16(self, rows: int) -> bool:
        """Whether a step of this many rows attends its prompt chunks in bf16. auto: where q, k and v came
        from bf16 tiles (already rounded to bf16 once) and had no bias. Measured (docs/measurements.md): pp512
        1.2x on SmolLM2 at the same KL and top-1 against fp32, 1.17x on Gemma 3 at top-1 97.4 -> 97.2%; on
        Qwen2.5, whose q and k biases make large scores, 1.05x for top-1 98.7 -> 98.2%, so biased layers stay
        fp32."""
        if self.prompt_attention != "auto":
            return self.prompt_attention == "bf16"
        if self.qkv_biased:
            return False
        tiles_from = self._qkv_tile_rows()
        return tiles_from is not None and rows >= tiles_from

    def _qkv_tile_rows(self) -> int | None:
        """From how many rows the q|k|v projection multiplies bf16 tiles (None: never, or a dense layer)."""
        return _bf16_tile_rows(self.qkv_proj)

    def prompt_path(self, dtype: str) -> str:
        """What prompt chunks attend in, for the startup line: 'bf16' or 'fp32' by name, or auto's outcome with
        its reason; dtype: the model's activations' name (fp32, bf16, fp16), what SDPA runs in otherwise."""
        if self.softcap:
            return f"{dtype}(soft-capping)"  # the capped scores are computed op by op in q's dtype
        if self.prompt_attention != "auto":
            return self.prompt_attention
        if dtype != "fp32":
            return f"{dtype}(dtype)"  # q is in the model's own dtype already
        if self.qkv_biased:
            return f"{dtype}(qkv-bias)"
        tiles_from = self._qkv_tile_rows()
        return f"bf16(from-{tiles_from}-rows)" if tiles_from is not None else f"{dtype}(no-bf16-tiles)"

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (N, hidden) -> (N, hidden)."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k, v = q.view(n, self.h, self.d), k.view(n, self.hkv, self.d), v.view(n, self.hkv, self.d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(q, ctx), self.rotary(k, ctx)
        k_cache, v_cache = ctx.kv_caches[self.layer]
        meta = ctx.attn[self.layer]
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.compiled_attention, self.softcap,
                            torch.bfloat16 if meta.prefills and self.prompt_bf16(n) else None)  # (N, H, D)
        return self.o_proj(o.reshape(n, self.q_size))
