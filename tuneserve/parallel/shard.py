"""Split a loaded model into one rank's tensor-parallel shard (Megatron-style), in place.

Per decoder layer: q/k/v and gate/up keep the rows of this rank's heads and intermediate units (column
parallel: no communication); o and down keep the matching input columns and sum their partial outputs
over the ranks with one all-reduce each (row parallel). A mixture of experts splits every expert so and
sums once, after the routed experts and the shared one are added up. Each rank holds num_heads / N query
heads and num_kv_heads / N KV heads; where N exceeds the KV heads, each KV head is replicated on
N / num_kv_heads ranks (as vLLM does), so a rank's query heads always find their KV head locally. Norms,
the embedding and the LM head are replicated (rank 0 alone computes logits and samples).

Quantized layers split as they are stored: rows are independent, and input columns split on group
boundaries (and the int4 32-input block layout). A layer whose split falls inside a group, or whose
inputs were permuted (GPTQ act-order), is dequantized and split as fp32, and the split reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.kernels.dense_ops import DenseLinear
from tuneserve.models.layers import Attention, GatedMLP
from tuneserve.models.moe import SparseMoE
from tuneserve.parallel.comm import Comm
from tuneserve.quant.linear import ConcatLinear, QuantEmbedding, QuantLinear


@dataclass(frozen=True)
class HeadSplit:
    """Which heads a rank holds: query heads [q0, q0 + nq), KV heads [k0, k0 + nk)."""

    q0: int
    nq: int
    k0: int
    nk: int

    @classmethod
    def of(cls, heads: int, kv_heads: int, rank: int, world: int) -> HeadSplit:
        nq = heads // world
        if kv_heads % world == 0:
            nk = kv_heads // world
            return cls(rank * nq, nq, rank * nk, nk)
        return cls(rank * nq, nq, rank // (world // kv_heads), 1)  # KV heads replicated


def local_kv_heads(arch: ArchConfig, world: int) -> int:
    return HeadSplit.of(arch.num_heads, arch.num_kv_heads, 0, world).nk


class RowParallel(nn.Module):
    """A linear layer holding some input columns: its partial outputs are summed over the ranks."""

    def __init__(self, inner: nn.Module, comm: Comm) -> None:
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.comm.all_reduce(y)
        return y


def shard_model(model: nn.Module, rank: int, world: int, comm: Comm) -> list[str]:
    """Keep only rank's shard of every attention and MLP block of model; returns the names of layers
    split through fp32 (see the module doc)."""
    fallback: list[str] = []
    dtype = model.norm.weight.dtype  # a layer split through fp32 computes in the model's dtype
    for i, layer in enumerate(model.layers):
        _shard_attention(layer.self_attn, rank, world, comm, _Fallback(fallback, f"layers.{i}.self_attn", dtype))
        mlp, where = layer.mlp, _Fallback(fallback, f"layers.{i}.mlp", dtype)
        if isinstance(mlp, SparseMoE):  # every expert split alike; the weighted sum is linear: one all-reduce
            for e, expert in enumerate(mlp.experts):
                _shard_mlp(expert, rank, world, None, _Fallback(fallback, f"{where.prefix}.experts.{e}", dtype))
            if mlp.shared_expert is not None:
                _shard_mlp(mlp.shared_expert, rank, world, None,
                           _Fallback(fallback, f"{where.prefix}.shared_expert", dtype))
            layer.mlp = RowParallel(mlp, comm)
        else:
            _shard_mlp(mlp, rank, world, comm, where)
    return fallback


@dataclass
class _Fallback:
    """Where a split through fp32 is recorded, and the dtype it is cast to."""

    names: list[str]
    prefix: str
    dtype: torch.dtype

    def checked(self, old: nn.Module, new: nn.Module, attr: str) -> nn.Module:
        if isinstance(new, DenseLinear) and not isinstance(old, nn.Linear):
            self.names.append(f"{self.prefix}.{attr}")
            return new.to(self.dtype)
        return new


def _shard_attention(a: Attention, rank: int, world: int, comm: Comm, fallback: _Fallback) -> None:
    s, d = HeadSplit.of(a.h, a.hkv, rank, world), a.d
    q = torch.arange(s.q0 * d, (s.q0 + s.nq) * d)
    k = torch.arange(s.k0 * d, (s.k0 + s.nk) * d)
    a.qkv_proj = take_rows(a.qkv_proj, torch.cat([q, a.q_size + k, a.q_size + a.kv_size + k]))
    o = take_cols(a.o_proj, s.q0 * d, (s.q0 + s.nq) * d, keep_bias=rank == 0)
    a.o_proj = RowParallel(fallback.checked(a.o_proj, o, "o_proj"), comm)
    a.h, a.hkv = s.nq, s.nk
    a.q_size, a.kv_size = s.nq * d, s.nk * d


def _shard_mlp(m: GatedMLP, rank: int, world: int, comm: Comm | None, fallback: _Fallback) -> None:
    """Keep rank's intermediate units; comm None: the caller sums the partial outputs."""
    n = m.inter // world
    mine = torch.arange(rank * n, (rank + 1) * n)
    m.gate_up_proj = take_rows(m.gate_up_proj, torch.cat([mine, m.inter + mine]))
    down = fallback.checked(m.down_proj, take_cols(m.down_proj, rank * n, (rank + 1) * n, keep_bias=rank == 0),
                            "down_proj")
    m.down_proj = down if comm is None else RowParallel(down, comm)
    m.inter = n


# ----- splitting one layer ----------------------------------------------------------------------
def take_rows(m: nn.Module, rows: torch.Tensor) -> nn.Module:
    """The layer computing only output features `rows` (ascending) of m."""
    if isinstance(m, ConcatLinear):
        parts, off = [], 0
        for p in m.parts:
            n = int(p.out_features)
            mine = rows[(rows >= off) & (rows < off + n)] - off
            if len(mine):
                parts.append(take_rows(p, mine))
            off += n
        return parts[0] if len(parts) == 1 else ConcatLinear(parts)
    if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding):
        pick = lambda t: None if t is None else t[rows].clone()  # noqa: E731
        return _like(m, QuantLinear(pick(m.qweight), pick(m.scales), pick(m.mins), pick(m.bias), m.perm,
                                    m.input_scale, pick(m.qhigh)))
    if isinstance(m, nn.Linear):
        return _dense(m.weight[rows], None if m.bias is None else m.bias[rows])
    raise TypeError(f"cannot split {type(m).__name__} by rows")


def take_cols(m: nn.Module, start: int, end: int, keep_bias: bool) -> nn.Module:
    """The layer taking only input features [start, end) of m (its bias kept only where keep_bias)."""
    if isinstance(m, ConcatLinear):
        return ConcatLinear([take_cols(p, start, end, keep_bias) for p in m.parts])
    if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding):
        bias = m.bias if keep_bias else None
        g, block = m.group_size, 1 if m.bits == 8 else 32
        if m.perm is not None or start % g or end % g or start % block or end % block:
            return _dense(m.dequantize()[:, start:end], bias)
        per = 1 if m.bits == 8 else 2
        cut = lambda t: None if t is None else t[:, start // g:end // g].clone()  # noqa: E731
        high = None if m.qhigh is None else m.qhigh[:, start // 32:end // 32].clone()
        scale = None if m.input_scale is None else m.input_scale[start:end].clone()
        return _like(m, QuantLinear(m.qweight[:, start // per:end // per].clone(), cut(m.scales), cut(m.mins),
                                    bias, None, scale, high))
    if isinstance(m, nn.Linear):
        return _dense(m.weight[:, start:end], m.bias if keep_bias else None)
    raise TypeError(f"cannot split {type(m).__name__} by columns")


def _dense(weight: torch.Tensor, bias: torch.Tensor | None) -> DenseLinear:
    out = DenseLinear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
    return out


def _like(old: QuantLinear, new: QuantLinear) -> QuantLinear:
    new.path, new.out_dtype, new.int8_activations = old.path, old.out_dtype, old.int8_activations
    return new
