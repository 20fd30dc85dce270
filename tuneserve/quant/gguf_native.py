"""quantization='gguf': serve a GGUF file's quantized tensors from their own blocks, as llama.cpp does.

Block formats (ggml's definitions; 32 or 256 weights per block, little-endian):
  Q4_1  20 B / 32: fp16 d, fp16 m, 16 B of nibbles (byte j: weight j low, weight j + 16 high); w = d q + m
  Q8_0  34 B / 32: fp16 d, 32 int8; w = d q
  Q5_0  22 B / 32: fp16 d, 32 high bits, 16 B of low nibbles; w = d (q - 16), q in [0, 31]
  Q5_1  24 B / 32: fp16 d, fp16 m, 32 high bits, 16 B of low nibbles; w = d q + m
  Q4_K  144 B / 256: fp16 d, fp16 dmin, 12 B of 6-bit (scale, min) pairs for 8 sub-blocks of 32, 128 B of
        nibbles (per 64 weights: 32 bytes, low nibbles the first 32, high nibbles the next 32);
        w = d sc q - dmin m
  Q6_K  210 B / 256: 128 B low nibbles, 64 B of 2-bit highs, 16 int8 scales (sub-blocks of 16), fp16 d;
        w = d sc (q - 32), q in [0, 63]
Q4_1, Q5_1 and Q8_0 map one to one onto our int4 / int5 / int8 layouts (same bytes: 5, 6 and 8.5 bits per
weight), so SmolLM2 runs at its file's size. Q5_0 is int5 with min = -16 d, exact in fp16 (6 bits per weight
against the file's 5.5; before int5 it took int8's 8.5). Q4_K and Q6_K are repacked exactly (same integer
codes) into int4 g32 / int8 g16 with fp16 scales (the sub-block scale products d * sc are rounded to fp16);
they take 5 and 9 bits per weight instead of 4.5 and 6.6. Other types fall back to the fp32
weights already loaded, and the report names them. The modules are plain QuantLinear / QuantEmbedding /
ConcatLinear: they run the kernels `loading` binds to them (kernels/config.py), like any quantized layer.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
from torch import nn

from tuneserve.kernels.quant_ops import high_bits, pack_int4, unpack_int4
from tuneserve.quant.apply import replace_module
from tuneserve.quant.linear import ConcatLinear, QuantEmbedding, QuantLinear
from tuneserve.weights.gguf import GGUFCheckpoint, hf_name, unpermute_rope_rows

NATIVE = ("Q4_1", "Q5_0", "Q5_1", "Q8_0")
REPACKED = ("Q4_K", "Q6_K")


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 -> (...) float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def decode(data: np.ndarray, kind: str) -> dict[str, np.ndarray]:
    """Raw blocks (rows, bytes per row) -> {'q': codes, 'scales': fp16 (rows, groups), 'mins' or None,
    'qhigh' (int5) or None, 'bits'}; for int4 / int5, q is already packed in our 32-input block layout."""
    rows = data.shape[0]
    if kind == "Q4_1":
        b = data.reshape(rows, -1, 20)
        return {"q": b[:, :, 4:].reshape(rows, -1), "scales": _f16(b[:, :, 0:2]),
                "mins": _f16(b[:, :, 2:4]), "bits": 4}
    if kind == "Q8_0":
        b = data.reshape(rows, -1, 34)
        return {"q": b[:, :, 2:].reshape(rows, -1).view(np.int8), "scales": _f16(b[:, :, 0:2]), "mins": None,
                "bits": 8}
    if kind in ("Q5_0", "Q5_1"):  # the low nibbles lie in our int4 block layout, the high bits as int5 keeps them
        at = 2 if kind == "Q5_0" else 4
        b = data.reshape(rows, -1, at + 20)
        d = _f16(b[:, :, 0:2])
        mins = d.astype(np.float32) * -16 if kind == "Q5_0" else _f16(b[:, :, 2:4])  # exact in fp16 ...
        if mins.dtype == np.float32:
            if np.isfinite(mins.astype(np.float16)).all():
                mins = mins.astype(np.float16)
            else:  # ... unless |d| > 4094: then both in fp32 (the kernels take fp32 scales too)
                d = d.astype(np.float32)
        return {"q": np.ascontiguousarray(b[:, :, at + 4:]).reshape(rows, -1), "scales": d, "mins": mins,
                "qhigh": np.ascontiguousarray(b[:, :, at:at + 4]).view(np.int32)[..., 0], "bits": 5}
    if kind == "Q4_K":
        return _decode_q4_k(data.reshape(rows, -1, 144))
    if kind == "Q6_K":
        return _decode_q6_k(data.reshape(rows, -1, 210))
    raise ValueError(f"no native path for {kind}")


def _decode_q4_k(b: np.ndarray) -> dict[str, np.ndarray]:
    rows, nsb = b.shape[:2]
    d, dmin = _f16(b[:, :, 0:2]).astype(np.float32), _f16(b[:, :, 2:4]).astype(np.float32)
    s = b[:, :, 4:16].astype(np.uint8)
    sc = np.empty((rows, nsb, 8), np.uint8)
    mn = np.empty((rows, nsb, 8), np.uint8)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    qs = b[:, :, 16:].reshape(rows, nsb, 4, 32)  # per 64 weights: low nibbles first 32, high next 32
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, nsb * 256)
    scales = (d[..., None] * sc).reshape(rows, -1).astype(np.float16)
    mins = (-(dmin[..., None] * mn)).reshape(rows, -1).astype(np.float16)
    packed = pack_int4(torch.from_numpy(codes.astype(np.uint8))).numpy()
    return {"q": packed, "scales": scales, "mins": mins, "bits": 4}


def _decode_q6_k(b: np.ndarray) -> dict[str, np.ndarray]:
    rows, nsb = b.shape[:2]
    ql = b[:, :, 0:128].reshape(rows, nsb, 2, 64)
    qh = b[:, :, 128:192].reshape(rows, nsb, 2, 32)
    sc = np.ascontiguousarray(b[:, :, 192:208]).view(np.int8).astype(np.float32)  # (rows, nsb, 16)
    d = _f16(b[:, :, 208:210]).astype(np.float32)
    q = np.empty((rows, nsb, 2, 4, 32), np.int16)  # per half of 128: four runs of 32 weights
    q[..., 0, :] = (ql[..., :32] & 15) | (((qh >> 0) & 3) << 4)
    q[..., 1, :] = (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4)
    q[..., 2, :] = (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4)
    q[..., 3, :] = (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)
    codes = (q - 32).reshape(rows, nsb * 256).astype(np.int8)
    scales = (d[..., None] * sc).reshape(rows, -1).astype(np.float16)
    return {"q": codes, "scales": scales, "mins": None, "bits": 8}


def _as_int8(part: dict) -> dict:
    """A Q5_0 part (int5 with min = -16 d) as int8 codes q - 16 with the same scales: the same weights, in the
    format of an int8 part it is stacked with (Qwen2.5's q and k are Q5_0 where v is Q8_0 in half the layers),
    so that the projection stays one matrix (one kernel call; the fused decode step takes no ConcatLinear)."""
    if part["bits"] != 5 or not np.array_equal(part["mins"], part["scales"] * part["scales"].dtype.type(-16)):
        return part
    codes = unpack_int4(torch.from_numpy(np.ascontiguousarray(part["q"]))) | high_bits(torch.from_numpy(part["qhigh"]))
    q = (codes.to(torch.int16) - 16).to(torch.int8).numpy()
    return {"q": q, "scales": part["scales"], "mins": None, "qhigh": None, "bits": 8}


def _to_module(parts: list[dict], like: nn.Module) -> nn.Module:
    """One QuantLinear from row-stacked parts of the same format, else a ConcatLinear of per-part ones."""
    t = torch.from_numpy
    if len({p["bits"] for p in parts}) > 1 and any(p["bits"] == 8 for p in parts):
        parts = [_as_int8(p) for p in parts]
    bias = getattr(like, "bias", None)
    bias = bias.detach().float() if bias is not None else None
    cls = QuantEmbedding if isinstance(like, nn.Embedding) else QuantLinear
    opt = lambda a: t(np.ascontiguousarray(a)) if a is not None else None  # noqa: E731
    same = len({(p["bits"], p["scales"].shape[1], p["q"].shape[1]) for p in parts}) == 1
    if same:
        cat = {k: np.concatenate([p[k] for p in parts]) if parts[0].get(k) is not None else None
               for k in ("q", "scales", "mins", "qhigh")}
        return cls(opt(cat["q"]), t(cat["scales"]), opt(cat["mins"]), bias, qhigh=opt(cat["qhigh"]))
    mods, row = [], 0
    for p in parts:
        n = p["q"].shape[0]
        b = bias[row:row + n] if bias is not None else None
        mods.append(QuantLinear(opt(p["q"]), t(p["scales"]), opt(p["mins"]), b, qhigh=opt(p.get("qhigh"))))
        row += n
    return ConcatLinear(mods)


def _plan(num_layers: int, untied_head: bool, tensors: dict) -> list[tuple[str, list[str]]]:
    """(our module, the checkpoint tensors it is made of) for every module that may be served natively. An
    expert's tensors are named as its slice of the stacked tensor (`expert_name`; `_source` finds them)."""
    plan = [("embed_tokens", ["embed_tokens"])]
    for i in range(num_layers):
        a, m = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        qkv = f"{a}.qkv_proj"  # phi3 files store it fused, in our row order
        plan += [(qkv, [qkv] if qkv + ".weight" in tensors else [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]),
                 (f"{a}.o_proj", [f"{a}.o_proj"])]
        mlps = [m] if f"{m}.down_proj.weight" in tensors or f"{m}.gate_up_proj.weight" in tensors else []
        if f"{m}.experts.down_proj.weight" in tensors:
            mlps += [f"{m}.experts.{e}" for e in range(int(tensors[f"{m}.experts.down_proj.weight"].shape[2]))]
        if f"{m}.shared_expert.down_proj.weight" in tensors:
            mlps.append(f"{m}.shared_expert")
        for p in mlps:
            gate_up = f"{p}.gate_up_proj"  # phi3: fused, in our row order
            plan += [(gate_up, [gate_up] if gate_up + ".weight" in tensors else [f"{p}.gate_proj", f"{p}.up_proj"]),
                     (f"{p}.down_proj", [f"{p}.down_proj"])]
    if untied_head and "lm_head.weight" in tensors:
        plan.append(("lm_head", ["lm_head"]))
    return plan


def _source(tensors: dict, name: str) -> tuple:  # (gguf ReaderTensor, expert index or None)
    """The file's tensor holding `name` (without ".weight"), and the expert's index where it is stacked."""
    t = tensors.get(name + ".weight")
    if t is not None:
        return t, None
    m = _EXPERT.match(name)
    return tensors[f"{m[1]}.experts.{m[3]}.weight"], int(m[2])


_EXPERT = re.compile(r"(.*)\.experts\.(\d+)\.(\w+)$")


def native_weights(path: str, num_layers: int, untied_head: bool) -> tuple[set[str], set[str]]:
    """What load_native will serve from the file's blocks: (the checkpoint's weight names, our modules'
    weight names), so that loading can skip dequantizing them (no fp32 copy is ever built)."""
    ck = GGUFCheckpoint(path)
    tensors = {hf_name(t.name, ck.architecture).removeprefix("model."): t for t in ck.reader.tensors}
    sources, targets = set(), set()
    for target, parts in _plan(num_layers, untied_head, tensors):
        if all(_source(tensors, p)[0].tensor_type.name in NATIVE + REPACKED for p in parts):
            sources.update(p + ".weight" for p in parts)
            targets.add(target + ".weight")
    return sources, targets


def load_native(model: nn.Module, path: str, progress: bool = True) -> dict:
    """Swap model's projections, embedding and head for modules over the GGUF file's own blocks."""
    ck = GGUFCheckpoint(path)
    arch = model.arch
    tensors = {hf_name(t.name, ck.architecture).removeprefix("model."): t for t in ck.reader.tensors}
    kinds: Counter = Counter()
    fallback: list[str] = []

    def part(name: str) -> dict | None:
        t, expert = _source(tensors, name)
        kind = t.tensor_type.name
        if kind not in NATIVE + REPACKED:
            return None
        d = decode(np.asarray(t.data if expert is None else t.data[expert]), kind)
        if ck.architecture in ("llama", "mistral") and name.endswith(("q_proj", "k_proj")):
            heads = arch.num_heads if name.endswith("q_proj") else arch.num_kv_heads
            for k in ("q", "scales", "mins", "qhigh"):
                if d.get(k) is not None:
                    d[k] = np.ascontiguousarray(unpermute_rope_rows(d[k], heads))
        kinds[kind] += 1
        return d

    for target, sources in _plan(arch.num_layers, model.lm_head is not None, tensors):
        parts = [part(s) for s in sources]
        if any(p is None for p in parts):
            fallback += [s for s, p in zip(sources, parts) if p is None]
            continue
        like = model.get_submodule(target)
        new = _to_module(parts, like)
        if isinstance(new, QuantEmbedding):
            new.out_dtype = like.weight.dtype
        replace_module(model, target, new)
    types = Counter(_source(tensors, s)[0].tensor_type.name for s in fallback)
    return {"native": sum(kinds[k] for k in NATIVE), "repacked": sum(kinds[k] for k in REPACKED),
            "types": dict(kinds), "fallback": fallback,
            "fallback_summary": ", ".join(f"{n} {k}" for k, n in types.items()) or "none"}
