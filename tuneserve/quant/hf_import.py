"""Loading GPTQ and AWQ checkpoints in the common Hugging Face layout into our packed modules.

GPTQ (AutoGPTQ / GPTQModel): per linear `qweight` int32 (K * bits / 32, N), inputs packed along K (value
j of a word in bits [bits * j, bits * (j + 1))); `qzeros` int32 (K / group, N * bits / 32) packed along
N; `scales` fp16 (K / group, N); optional `g_idx` (K,), the group of each input (act-order checkpoints).
w[k, n] = scales[g, n] * (q[k, n] - z[g, n]) with g = g_idx[k], where the stored zero is z - 1 in the
original format ("gptq", v1) and z itself in "gptq_v2".
AWQ (GEMM version): `qweight` int32 (K, N / 8) packed along N in the interleaved order 0 2 4 6 1 3 5 7,
`qzeros` (K / group, N / 8) likewise, `scales` (K / group, N); w = scales * (q - z).
Both become w = q * scale + min with min = -z * scale (fp32 scales, so the conversion is exact); an
act-order g_idx becomes our input permutation. Projections we fuse (q|k|v, gate|up) are stacked when
their parts agree on format and permutation, else kept as parts (ConcatLinear); Phi-3's checkpoints fuse
them already (`qkv_proj`, `gate_up_proj`, rows q|k|v and gate|up as ours: models/phi3.py), so each of
those packed tensors fills our fused module whole. 8-bit GPTQ loads when its zero point is the same
everywhere (symmetric checkpoints); per-group 8-bit zeros are refused, and so are quantized tensors of
modules we do not have (a mixture of experts' experts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tuneserve.quant.apply import replace_module
from tuneserve.quant.linear import ConcatLinear, QuantLinear
from tuneserve.weights.safetensors import HFCheckpoint

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output AWQ_ORDER[i]
FUSED = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
         "v_proj": ("self_attn.qkv_proj", 2), "gate_proj": ("mlp.gate_up_proj", 0),
         "up_proj": ("mlp.gate_up_proj", 1), "o_proj": ("self_attn.o_proj", 0),
         "down_proj": ("mlp.down_proj", 0), "qkv_proj": ("self_attn.qkv_proj", 0),
         "gate_up_proj": ("mlp.gate_up_proj", 0)}


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned values, each word expanded into 32 / bits values along dim."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    w = words.to(torch.int32).unsqueeze(-1)
    vals = (w >> shifts) & ((1 << bits) - 1)  # (..., per)
    if dim == 0:
        return vals.permute(0, 2, 1).reshape(-1, words.shape[1])
    return vals.reshape(words.shape[0], -1)


def gptq_dense(t: dict[str, torch.Tensor], bits: int, v1: bool) -> tuple[torch.Tensor, ...]:
    """GPTQ tensors -> codes (K, N), zeros (K/group, N), scales (K/group, N) fp32, g_idx (K,)."""
    q = unpack_words(t["qweight"], bits, 0)
    z = unpack_words(t["qzeros"], bits, 1) + (1 if v1 else 0)
    s = t["scales"].float()
    k = q.shape[0]
    g_idx = t.get("g_idx")
    g_idx = g_idx.long() if g_idx is not None else torch.arange(k) // (k // s.shape[0])
    return q, z, s, g_idx


def awq_dense(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """AWQ GEMM tensors -> codes (K, N), zeros (K/group, N), scales (K/group, N), g_idx (K,)."""
    def unpack(words: torch.Tensor) -> torch.Tensor:
        v = unpack_words(words, 4, 1).view(words.shape[0], -1, 8)  # nibble order
        out = torch.empty_like(v)
        out[:, :, list(AWQ_ORDER)] = v
        return out.view(words.shape[0], -1)

    q, z, s = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"].float()
    return q, z, s, torch.arange(q.shape[0]) // (q.shape[0] // s.shape[0])


def to_ours(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor, bits: int) -> dict | None:
    """(K, N) codes with per-group zeros/scales -> our (N, K) codes, scales, mins, perm; None if int8
    with varying zeros (no exact symmetric form)."""
    k, n = q.shape
    ng = s.shape[0]
    perm = None
    if not torch.equal(g_idx, torch.arange(k) // (k // ng)):
        if not bool((torch.bincount(g_idx, minlength=ng) == k // ng).all()):
            return None
        perm = torch.argsort(g_idx, stable=True)
        q = q[perm]
    if bits == 8:
        if not bool((z == z.flatten()[0]).all()):
            return None
        codes = (q.long() - int(z.flatten()[0])).t().contiguous()
        return {"q": codes.clamp(-128, 127), "scales": s.t().contiguous(), "mins": None, "perm": perm}
    return {"q": q.t().contiguous(), "scales": s.t().contiguous(), "mins": (-z.float() * s).t().contiguous(),
            "perm": perm}


def _same(parts: list[dict]) -> bool:
    a = parts[0]
    return all(p["scales"].shape[1] == a["scales"].shape[1] and (p["mins"] is None) == (a["mins"] is None)
               and ((p["perm"] is None and a["perm"] is None) or
                    (p["perm"] is not None and a["perm"] is not None and torch.equal(p["perm"], a["perm"])))
               for p in parts)


def _build(parts: list[dict], biases: list[torch.Tensor | None]) -> nn.Module:
    from tuneserve.kernels.quant_ops import pack_int4

    def one(p: dict, b: torch.Tensor | None) -> QuantLinear:
        packed = pack_int4(p["q"]) if p["mins"] is not None else p["q"].to(torch.int8)
        return QuantLinear(packed, p["scales"], p["mins"], b, p["perm"])

    if len(parts) > 1 and _same(parts):
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
        cat = {k: torch.cat([p[k] for p in parts]) if parts[0][k] is not None else None
               for k in ("q", "scales", "mins")}
        return one({**cat, "perm": parts[0]["perm"]}, bias)
    if len(parts) == 1:
        return one(parts[0], biases[0])
    return ConcatLinear([one(p, b) for p, b in zip(parts, biases)])


def load_hf_quantized(model: nn.Module, path: Path, kind: str) -> dict:
    """Fill model from an HF GPTQ or AWQ directory (quantized projections + plain other tensors)."""
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    bits = int(qc.get("bits", 4))
    if kind == "awq" and (bits != 4 or str(qc.get("version", "gemm")).lower() != "gemm"):
        raise ValueError(f"{path}: only 4-bit AWQ in the GEMM layout is supported, got {qc}")
    v1 = str(qc.get("checkpoint_format", "gptq")).lower() != "gptq_v2"
    quant: dict[str, dict[str, torch.Tensor]] = {}
    plain: list[tuple[str, torch.Tensor]] = []
    for name, t in HFCheckpoint(path).tensors(progress=False):
        base, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "qzeros", "scales", "g_idx"):
            quant.setdefault(base, {})[leaf] = t
        else:
            plain.append((name, t))
    def is_qbias(n: str) -> bool:
        return n.endswith(".bias") and n.rpartition(".")[0] in quant

    biases = {n.rpartition(".")[0]: t for n, t in plain if is_qbias(n)}
    plain = [(n, t) for n, t in plain if not is_qbias(n)]
    groups: dict[str, dict[int, tuple[str, dict | None]]] = {}
    fallback = []
    for base, t in quant.items():
        dense = gptq_dense(t, bits, v1) if kind == "gptq" else awq_dense(t)
        ours = to_ours(*dense, bits)
        if ours is None:
            fallback.append(base)
        layer, proj = base.removeprefix("model.").rsplit(".", 2)[0], base.rsplit(".", 1)[1]
        if proj not in FUSED:  # e.g. a mixture-of-experts checkpoint's quantized experts
            raise ValueError(f"{path}: quantized {base!r} has no place in our models; quantized projections "
                             f"load for {sorted(FUSED)}")
        target, idx = FUSED[proj]
        groups.setdefault(f"{layer}.{target}", {})[idx] = (base, ours)
    for target, parts in groups.items():
        ordered = [parts[i] for i in sorted(parts)]
        if any(base in fallback for base, _ in ordered):
            raise ValueError(f"{path}: {target} is 8-bit with per-group zero points (or uneven act-order "
                             "groups), which has no exact form in our symmetric int8 layout")
        replace_module(model, target, _build([p for _, p in ordered], [biases.get(b) for b, _ in ordered]))
    model.load_weights(plain)
    return {"checkpoint": str(path), "method": kind, "bits": bits, "group_size": qc.get("group_size"),
            "quantized_layers": len(quant)}


def dequant_dense(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """(K, N) fp32 weight from dense GPTQ/AWQ codes (for tests)."""
    return (q.float() - z[g_idx].float()) * s[g_idx]
