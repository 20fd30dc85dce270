"""FusedDecode: a llama-family model's decoder layers run as one compiled call on decode steps.

A step qualifies when every row is a short query (decodes, speculative verification; no prompt chunk)
and there are fewer rows than every linear's small-batch kernel takes. The plan (kernels/decode_step.py's
structures: each layer's norms, linears, rotary tables and KV cache) is built at the first such step and
kept: it holds raw pointers, so it is rebuilt when the KV caches it points at change, and dropped when
kernels are bound again (after quantization). A model qualifies only where every part is one the C step
computes exactly as the op-by-op path does: llama's or gemma 3's layers (no MoE, no soft-capping),
compiled attention, fp32 weights or the compiled quantized kernels without permuted or scaled inputs, no
tensor-parallel wrappers; otherwise `plan` is None and the layers run one by one.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import nn

from tuneserve.kernels import decode_step
from tuneserve.kernels.decode_step import ACTS, GroupT, LayerT, LinearT, ModelT, ptr
from tuneserve.models.layers import Attention, ForwardContext, GatedMLP, RMSNorm


@dataclass
class _Plan:
    model: ModelT
    layers: ctypes.Array  # kept alive: model.layers points into it
    group_firsts: list[int]  # the first layer of each KV group, in group order: whose metadata a step passes
    max_rows: int  # the fewest rows any linear's kernel takes
    key: tuple  # the KV cache pointers it was built for


class FusedDecode:
    """Decides per step whether the fused call applies, and makes it."""

    def __init__(self, model: nn.Module, layer_cls: type[nn.Module],
                 norms: tuple[str, str | None, str, str | None]) -> None:
        self.model = model
        self.layer_cls = layer_cls  # the one decoder layer class whose forward the C step computes
        # that class's norm attributes: before attention, on its output, before the MLP, on its output
        self.norms = norms
        # the model's final norm runs in the C step where it is the layers' kind of RMS norm (`run` says so)
        final = getattr(model, "norm", None)
        self.final_norm = final if type(final) is RMSNorm and final.eps == model.arch.rms_norm_eps else None
        self._plan: _Plan | None = None
        self._refused = False  # a part of the model the C step does not compute

    def refusal(self) -> str | None:
        """Why this model's layers cannot run fused (None: they can, on fp32 CPU activations)."""
        if not decode_step.available():
            return "not built"
        m = self.model
        for layer in m.layers:
            why = _layer_refusal(layer, self.layer_cls, self.norms, m.arch.rms_norm_eps)
            if why:
                return why
        first = _shape(m.layers[0])
        return None if all(_shape(la) == first for la in m.layers) else "layers of different shapes"

    def takes(self, x: torch.Tensor, ctx: ForwardContext) -> bool:
        """Whether this step's rows may run fused."""
        if self._refused or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        plan = self._plan_for(ctx)
        return (plan is not None and x.shape[0] < plan.max_rows
                and not any(ctx.attn[i].prefills or ctx.attn[i].short_rows is None for i in plan.group_firsts))

    def run(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The hidden states after every layer, x (rows, hidden) -> (rows, hidden), passed through the model's
        final norm too where `final_norm` is set."""
        plan = self._plan
        x = x.contiguous().clone()
        groups = (GroupT * len(plan.group_firsts))(*(_group(ctx.attn[i]) for i in plan.group_firsts))
        decode_step.run(plan.model, groups, ctx.positions, x)
        return x

    def _plan_for(self, ctx: ForwardContext) -> _Plan | None:
        key = tuple(k.data_ptr() for k, _ in ctx.kv_caches[:1]) + (len(ctx.kv_caches),)
        if self._plan is None or self._plan.key != key:
            self._plan = None if self.refusal() else self._build(ctx, key)
            self._refused = self._plan is None
        return self._plan

    def _build(self, ctx: ForwardContext, key: tuple) -> _Plan | None:
        """The plan over ctx's KV caches (the layers qualify: `refusal`), or None where a cache does not."""
        m = self.model
        if not all(_f32_contiguous(k, v) for k, v in ctx.kv_caches):
            return None
        first_of: dict[int, int] = {}
        group_of_layer = [first_of.setdefault(id(ctx.attn[i]), len(first_of)) for i in range(len(m.layers))]
        descs = [_layer(layer, self.norms, ctx.kv_caches[i], group_of_layer[i]) for i, layer in enumerate(m.layers)]
        layers = (LayerT * len(descs))(*(d for d, _ in descs))
        attn, mlp = m.layers[0].self_attn, m.layers[0].mlp
        model = ModelT(num_layers=len(descs), hidden=m.arch.hidden_size, heads=attn.h, kv_heads=attn.hkv,
                       head_dim=attn.d, inter=mlp.inter, block_size=ctx.kv_caches[0][0].shape[1],
                       act=ACTS[mlp.act], eps=m.arch.rms_norm_eps, layers=layers,
                       attention=decode_step.attention_address(),
                       final_norm=ptr(self.final_norm.weight) if self.final_norm is not None else None)
        group_firsts = [group_of_layer.index(g) for g in range(len(first_of))]
        return _Plan(model, layers, group_firsts, min(rows for _, rows in descs), key)


def _group(meta) -> GroupT:  # noqa: ANN001 - kernels.attention.AttentionMetadata
    bt = meta.short_block_table
    return GroupT(slots=meta.slot_mapping.data_ptr(), rows=meta.flat_rows.data_ptr(),
                  qpos=meta.flat_qpos.data_ptr(), row_seq=meta.flat_seq.data_ptr(), block_table=bt.data_ptr(),
                  max_blocks=bt.shape[1], num_rows=meta.flat_rows.numel(), window=meta.window, sinks=meta.sinks)


def _shape(layer: nn.Module) -> tuple:
    a, m = layer.self_attn, layer.mlp
    return a.h, a.hkv, a.d, m.inter, m.act


def _norms(layer: nn.Module, names: tuple) -> list[RMSNorm | None]:
    return [None if n is None else getattr(layer, n) for n in names]


def _layer_refusal(layer: nn.Module, layer_cls: type[nn.Module], norm_names: tuple, eps: float) -> str | None:
    """What in this layer the C step does not compute exactly as its forward does, or None."""
    if type(layer) is not layer_cls:
        return f"{type(layer).__name__} layers"
    attn, mlp = layer.self_attn, layer.mlp
    if type(mlp) is not GatedMLP or type(attn) is not Attention:
        return f"{type(mlp).__name__} MLP" if type(mlp) is not GatedMLP else f"{type(attn).__name__} attention"
    if attn.softcap:
        return "soft-capping"
    if not attn.compiled_attention:
        return "torch attention"
    norms = [*_norms(layer, norm_names), attn.q_norm, attn.k_norm]
    if not all(n is None or (type(n) is RMSNorm and n.eps == eps and _f32_contiguous(n.weight)) for n in norms):
        return "norms other than fp32 RMS norms of the model's eps"
    rot = attn.rotary
    if not _f32_contiguous(rot.cos, rot.sin):
        return "rotary tables not fp32"
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    for name, lin in zip(names, (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
        if _linear(lin) is None:
            return f"{name} has no small-batch kernel ({type(lin).__name__})"
    return None


def _layer(layer: nn.Module, norm_names: tuple, kv: tuple[torch.Tensor, torch.Tensor],
           group: int) -> tuple[LayerT, int]:
    """A qualifying layer's description over its KV cache, and the rows its linears take."""
    attn, mlp = layer.self_attn, layer.mlp
    attn_in, attn_out, mlp_in, mlp_out = _norms(layer, norm_names)
    lins = [_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    rot = attn.rotary
    desc = LayerT(in_norm=attn_in.weight.data_ptr(), post_norm=mlp_in.weight.data_ptr(),
                  attn_out_norm=ptr(None if attn_out is None else attn_out.weight),
                  mlp_out_norm=ptr(None if mlp_out is None else mlp_out.weight),
                  q_norm=ptr(None if attn.q_norm is None else attn.q_norm.weight),
                  k_norm=ptr(None if attn.k_norm is None else attn.k_norm.weight),
                  qkv=lins[0][0], o=lins[1][0], gate_up=lins[2][0], down=lins[3][0],
                  cos=rot.cos.data_ptr(), sin=rot.sin.data_ptr(), rot=rot.rot_dim, k_cache=kv[0].data_ptr(),
                  v_cache=kv[1].data_ptr(), group=group, scale=attn.scale)
    return desc, min(rows for _, rows in lins)


def _linear(m: nn.Module) -> tuple[LinearT, int] | None:
    describe = getattr(m, "fused_linear", None)
    return describe() if callable(describe) else None


def _f32_contiguous(*ts: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in ts)
