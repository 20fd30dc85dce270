"""Walking a model: which layers get quantized, building the packed modules, swapping them in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn
from tqdm import tqdm

from tuneserve.quant.linear import QuantEmbedding, QuantLinear
from tuneserve.quant.recipe import GROUP_SIZES, QuantRecipe, fitting_group_sizes
from tuneserve.quant.rtn import quantize_int4, quantize_int8

LAYER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
EXPERT_LINEARS = ("gate_up_proj", "down_proj")  # the router and the shared expert's gate stay unquantized


def target_layers(model: nn.Module, embeddings: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every plain Linear/Embedding a quantization recipe replaces, in model order."""
    mods = dict(model.named_modules())
    if embeddings and isinstance(mods.get("embed_tokens"), nn.Embedding):
        yield "embed_tokens", mods["embed_tokens"]
    for i in range(len(model.layers)):
        for suffix in LAYER_LINEARS:
            name = f"layers.{i}.{suffix}"
            if isinstance(mods.get(name), nn.Linear):
                yield name, mods[name]
        for name, m in model.layers[i].named_modules():  # mixture of experts: every expert's projections
            if (name.startswith(("mlp.experts.", "mlp.shared_expert.")) and name.rpartition(".")[2] in EXPERT_LINEARS
                    and isinstance(m, nn.Linear)):
                yield f"layers.{i}.{name}", m
    if embeddings and isinstance(mods.get("lm_head"), nn.Linear):
        yield "lm_head", mods["lm_head"]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def pack_weight(w: torch.Tensor, spec: QuantRecipe, embedding: bool = False, bias: torch.Tensor | None = None,
                search: bool = False, input_scale: torch.Tensor | None = None) -> QuantLinear:
    """Quantize w (N, K) round-to-nearest into a QuantLinear (QuantEmbedding when embedding)."""
    cls = QuantEmbedding if embedding else QuantLinear
    if spec.bits == 8:
        q, s = quantize_int8(w, spec.group_size)
        return cls(q, s, None, bias, input_scale=input_scale)
    q, s, m = quantize_int4(w, spec.group_size or w.shape[1], spec.symmetric, search)
    return cls(q, s, m, bias, input_scale=input_scale)


def from_quantized(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, like: nn.Module,
                   perm: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear / QuantEmbedding replacing `like` from unpacked integer codes q (N, K)."""
    from tuneserve.kernels.quant_ops import pack_int4

    cls = QuantEmbedding if isinstance(like, nn.Embedding) else QuantLinear
    bias = getattr(like, "bias", None)
    packed = pack_int4(q) if mins is not None else q.to(torch.int8)
    new = cls(packed, scales, mins, bias.detach() if bias is not None else None, perm, input_scale)
    new.out_dtype = like.weight.dtype
    return new


@torch.no_grad()
def rtn_quantize(model: nn.Module, spec: QuantRecipe, progress: bool = True) -> None:
    """Round-to-nearest quantization of every target layer, in place."""
    layers = list(target_layers(model, spec.embeddings))
    for name, m in tqdm(layers, desc=f"quantizing int{spec.bits} (RTN)", disable=not progress, leave=False):
        bias = getattr(m, "bias", None)
        new = pack_weight(m.weight.detach().float(), spec, isinstance(m, nn.Embedding),
                          bias.detach() if bias is not None else None)
        new.out_dtype = m.weight.dtype
        replace_module(model, name, new)


def linear_inputs(model: nn.Module, spec: QuantRecipe) -> dict[str, int]:
    """Input size of every layer the spec quantizes (name -> K)."""
    return {name: int(m.weight.shape[1]) for name, m in target_layers(model, spec.embeddings)}


def resolve_group_size(model: nn.Module, spec: QuantRecipe) -> QuantRecipe:
    """Fill in the default group size, or check the requested one against every layer."""
    sizes = linear_inputs(model, spec)
    fits = fitting_group_sizes(list(sizes.values()), spec.bits)
    g = spec.group_size
    if g is None:
        if spec.bits == 8:
            return spec
        g = next((c for c in reversed(GROUP_SIZES) if c in fits), None)
        if g is None:
            raise ValueError(f"no int4 group size in {GROUP_SIZES} divides the input sizes "
                             f"{sorted(set(sizes.values()))}; sizes that fit: {fits or 'none'}")
        return replace(spec, group_size=g)
    bad = {name: k for name, k in sizes.items() if k % g}
    if bad or (spec.bits == 4 and g % 32):
        name, k = next(iter(bad.items())) if bad else ("", 0)
        where = f"the input size {k} of {name}" if bad else "int4's 32-input blocks"
        raise ValueError(f"group size {g} does not fit {where}; group sizes that fit every layer of this "
                         f"model: {', '.join(map(str, fits)) or 'none'}")
    return spec
