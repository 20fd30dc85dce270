"""Layer-by-layer GPTQ / AWQ over calibration windows, in the order the layers compute.

The calibration windows' hidden states go through the model one decoder layer at a time. Within a layer
the four projections are quantized in compute order (true-sequential): q|k|v from the input norm's
output; o_proj from the attention output computed with the quantized q|k|v; gate|up from the norm after
the quantized attention block; down_proj from act(gate) * up of the quantized gate|up. The layer's output
(all quantized) is the next layer's input, so each layer is calibrated on what it will really see, as in
the GPTQ paper. The LM head last, on the final norm's output; an untied embedding is rounded to nearest.
Each stage needs only its inputs' statistics (calibrate.InputStats), accumulated batch by batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from tuneserve.calibration.awq import awq_quantize, awq_search, choice_loss, scaled_hessian
from tuneserve.calibration.calibrate import InputStats, fresh_context
from tuneserve.calibration.gptq import gptq_quantize, output_error
from tuneserve.kernels.activation_ops import act_fp32
from tuneserve.quant.apply import from_quantized, pack_weight, replace_module
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.quant.rtn import fake_quant

BATCH_TOKENS = 4096  # calibration tokens per forward call
# GPTQ and AWQ leave gate|up's ranges unclipped: on Qwen2.5-Coder-0.5B g128 the clipping search lowered
# gate|up's output error yet raised perplexity. AWQ with every other kind clipped: wikipedia 46.2 -> 50.8 when
# gate|up was clipped too, python-docs 12.4 -> 12.9 (checkpoints swapped by module kind). GPTQ (`tuneserve
# eval --max-tokens 4096`, wikipedia / python-docs): 42.15 / 11.71 unclipped against 42.31 / 11.90 clipped.
# Clipping is a biased error: it shrinks the largest weights, and per-layer output error does not see how that
# compounds.
UNCLIPPED = ("mlp.gate_up_proj",)


def _mlp_hidden(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(gate) * up: the input of down_proj."""
    gate, up = mlp.gate_up_proj(x).split(mlp.inter, dim=-1)
    return act_fp32(gate, mlp.act) * up


def _attention_output(attn: nn.Module, x: torch.Tensor, ctx) -> torch.Tensor:  # noqa: ANN001
    """The attention block's output before o_proj: (T, q_size)."""
    o_proj, attn.o_proj = attn.o_proj, nn.Identity()
    try:
        return attn(x, ctx)
    finally:
        attn.o_proj = o_proj


class Calibrator:
    """Holds the calibration batches and quantizes one module at a time from its input statistics."""

    def __init__(self, model: nn.Module, spec: QuantRecipe, windows: list[list[int]]) -> None:
        self.model, self.spec = model, spec
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        seq = len(windows[0])
        per = max(1, BATCH_TOKENS // seq)
        self.ids = [torch.tensor(windows[i:i + per], device=self.device).flatten()
                    for i in range(0, len(windows), per)]
        self.ctxs = {}
        for b in self.ids:
            n = b.numel() // seq
            if n not in self.ctxs:
                self.ctxs[n] = fresh_context(model.arch, [seq] * n, self.device, self.dtype)
        self.seq = seq
        self.awq_block = spec.method == "awq" and spec.awq_block_loss
        self.errors: dict[str, tuple[float, float]] = {}  # name -> (method error, RTN error)

    def ctx(self, batch: torch.Tensor):  # noqa: ANN201
        return self.ctxs[batch.shape[0] // self.seq]

    def stats(self, inputs: list[torch.Tensor]) -> InputStats:
        st = InputStats(inputs[0].shape[-1], self.device)
        for x in inputs:
            st.add(x)
        return st

    def quantize(self, name: str, module: nn.Module, st: InputStats, fold: nn.Module | None = None,
                 block_loss: Callable[[torch.Tensor], float] | None = None) -> None:
        """Replace module (at `name` in the model) by its GPTQ/AWQ quantization for inputs with stats st;
        AWQ's input scaling goes into `fold` (an RMSNorm feeding only this module) or the layer itself,
        chosen on `block_loss(w_hat)` where given."""
        spec, embedding = self.spec, isinstance(module, nn.Embedding)
        w, h = module.weight.detach().float(), st.hessian
        group = spec.group_size or w.shape[1]
        if spec.method == "gptq":
            act_order = spec.act_order and not embedding
            clip = spec.clip_search and not name.endswith(UNCLIPPED)
            r = gptq_quantize(w, h, spec.bits, group, spec.symmetric, act_order, spec.damp, clip)
            new = from_quantized(r["q"], r["scales"], r["mins"], module, perm=r["perm"])
        else:
            r = self._awq(name, w, h, st, group, embedding, block_loss)
            if fold is not None:
                fold.weight.data /= r["s"].to(fold.weight.dtype)
            new = from_quantized(r["q"], r["scales"], r["mins"], module, perm=r["perm"],
                                 input_scale=None if fold is not None or bool((r["s"] == 1).all()) else 1.0 / r["s"])
        rtn = fake_quant(w, spec.bits, group, spec.symmetric)
        self.errors[name] = (output_error(w, r["w_hat"], h), output_error(w, rtn, h))
        replace_module(self.model, name, new)

    def _awq(self, name: str, w: torch.Tensor, h: torch.Tensor, st: InputStats, group: int, embedding: bool,
             block_loss: Callable[[torch.Tensor], float] | None) -> dict:
        """AWQ's input scales s and the scaled weight's codes: {'s', 'q', 'scales', 'mins', 'perm', 'w_hat'}."""
        spec = self.spec
        clip = spec.clip_search and not name.endswith(UNCLIPPED)
        if spec.awq_rounding == "gptq":
            return self._awq_gptq(w, h, st, group, embedding, clip, block_loss)
        r = awq_quantize(w, h, st.abs_mean, spec.bits, group, spec.symmetric, spec.awq_grid, clip, block_loss)
        return {**r, "q": _codes_from(r["deq"], r["scales"], r["mins"]), "perm": None}

    def _awq_gptq(self, w: torch.Tensor, h: torch.Tensor, st: InputStats, group: int, embedding: bool, clip: bool,
                  block_loss: Callable[[torch.Tensor], float] | None) -> dict:
        """AWQ's scales, then GPTQ on the scaled weight and inputs. The scales are searched with
        round-to-nearest, and GPTQ's error feedback can undo what they buy: on Qwen2.5-Coder-0.5B g128,
        GPTQ with AWQ-scaled q|k|v scored 43.99 / 12.32 wikipedia / python-docs perplexity against 42.31 /
        11.90 unscaled (modules swapped between checkpoints). So GPTQ rounds both the scaled and the unscaled
        weight, and the one with the lower loss (block loss, else layer output error) is kept."""
        spec = self.spec
        s, _ = awq_search(w, h, st.abs_mean, spec.bits, group, spec.symmetric, spec.awq_grid, block_loss)
        tried = []  # (loss, result) per candidate; min keeps the first of equal losses, the scaled one
        for cand in [s] if bool((s == 1).all()) else [s, torch.ones_like(s)]:
            r = gptq_quantize(w * cand, scaled_hessian(h, cand), spec.bits, group, spec.symmetric,
                              spec.act_order and not embedding, spec.damp, clip)
            w_hat = r["w_hat"] / cand
            tried.append((choice_loss(w, w_hat, h, block_loss), {**r, "s": cand, "w_hat": w_hat}))
        return min(tried, key=lambda t: t[0])[1]


def _codes_from(deq: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None) -> torch.Tensor:
    """Integer codes (N, K) of dequantized values on the given grid."""
    n, k = deq.shape
    g = k // scales.shape[1]
    d = deq.view(n, -1, g)
    if mins is None:
        return (d / scales.float().unsqueeze(-1)).round().clamp(-127, 127).view(n, k)
    return ((d - mins.float().unsqueeze(-1)) / scales.float().unsqueeze(-1)).round().clamp(0, 15).view(n, k)


def _attention_block_loss(cal: Calibrator, attn: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], float]:
    """loss(w_hat): squared error of the attention block's output on the first calibration batch x when
    q|k|v use the weight w_hat instead of their own (o_proj still unquantized, as when AWQ scores it)."""
    ctx = cal.ctx(cal.ids[0])
    ref = attn(x, ctx)
    weight = attn.qkv_proj.weight

    def loss(w_hat: torch.Tensor) -> float:
        saved = weight.data
        weight.data = w_hat.to(saved.dtype)
        try:
            return float(((attn(x, ctx) - ref).float() ** 2).sum())
        finally:
            weight.data = saved

    return loss


@torch.no_grad()
def quantize_layer(cal: Calibrator, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """Quantize decoder layer i's four projections in order; returns the layer's outputs per batch."""
    layer = cal.model.layers[i]
    attn, mlp = layer.self_attn, layer.mlp
    gemma = hasattr(layer, "pre_feedforward_layernorm")
    pre_mlp = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    p = f"layers.{i}."
    block = _attention_block_loss(cal, attn, layer.input_layernorm(hidden[0])) if cal.awq_block else None
    cal.quantize(p + "self_attn.qkv_proj", attn.qkv_proj,
                 cal.stats([layer.input_layernorm(h) for h in hidden]), fold=layer.input_layernorm,
                 block_loss=block)
    att = [_attention_output(attn, layer.input_layernorm(h), cal.ctx(b)) for h, b in zip(hidden, cal.ids)]
    cal.quantize(p + "self_attn.o_proj", attn.o_proj, cal.stats(att))
    h1 = []
    for h, a in zip(hidden, att):
        o = attn.o_proj(a)
        h1.append(h + (layer.post_attention_layernorm(o) if gemma else o))
    del att
    cal.quantize(p + "mlp.gate_up_proj", mlp.gate_up_proj, cal.stats([pre_mlp(h) for h in h1]), fold=pre_mlp)
    st = InputStats(mlp.down_proj.weight.shape[1], cal.device)
    for h in h1:
        st.add(_mlp_hidden(mlp, pre_mlp(h)))
    cal.quantize(p + "mlp.down_proj", mlp.down_proj, st)
    out = []
    for h in h1:
        d = mlp.down_proj(_mlp_hidden(mlp, pre_mlp(h)))
        out.append(h + (layer.post_feedforward_layernorm(d) if gemma else d))
    return out


@torch.no_grad()
def quantize_sequential(model: nn.Module, spec: QuantRecipe, windows: list[list[int]],
                        progress: bool = True) -> dict:
    """GPTQ or AWQ for every projection, then the LM head; returns per-layer output errors vs RTN."""
    cal = Calibrator(model, spec, windows)
    if spec.embeddings and model.lm_head is not None:  # untied: the lookup table is rounded to nearest
        emb = model.embed_tokens
        new = pack_weight(emb.weight.detach().float(), spec, embedding=True)
        new.out_dtype = emb.weight.dtype
        replace_module(model, "embed_tokens", new)
    hidden = [model.embed(b) for b in cal.ids]
    for i in tqdm(range(len(model.layers)), desc=f"{spec.method} int{spec.bits}", unit="layer",
                  disable=not progress, leave=False):
        hidden = quantize_layer(cal, i, hidden)
    if spec.embeddings:
        st = cal.stats([model.norm(h) for h in hidden])
        if model.lm_head is not None:
            cal.quantize("lm_head", model.lm_head, st)
        else:
            cal.quantize("embed_tokens", model.embed_tokens, st)
    ratio = {k: (e / r if r > 0 else 0.0) for k, (e, r) in cal.errors.items()}
    return {"output_error_vs_rtn": ratio,
            "mean_error_ratio": sum(ratio.values()) / max(1, len(ratio))}
