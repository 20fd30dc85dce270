"""Quantized checkpoints: our own directory format, and HF GPTQ / AWQ directories users bring.

Ours (`tuneserve quantize ... --out DIR`): DIR/model.safetensors holds the model's state dict under our
module names (packed qweight / scales / mins / perm / input_scale buffers, plus every unquantized
parameter); DIR/quantization.json the recipe (method, bits, group size, calibration corpus, samples,
sequence length, seed) and where the weights came from; DIR/config.json an HF-style config (so DIR is a
model path too) and the tokenizer files. The packed modules are rebuilt from the tensors' shapes.
HF GPTQ / AWQ directories (config.json `quantization_config`) are converted in hf_import.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.quant.apply import replace_module
from tuneserve.quant.linear import ConcatLinear, QuantEmbedding, QuantLinear

FORMAT = "tuneserve-quant"
META = "quantization.json"


def quant_kind(path: str | Path) -> str | None:
    """'tuneserve', 'gptq' or 'awq' when path is a quantized checkpoint directory, else None."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / META).is_file():
        return "tuneserve"
    cfg = p / "config.json"
    if cfg.is_file():
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
        method = str(qc.get("quant_method", "")).lower()
        return method if method in ("gptq", "awq") else None
    return None


def hf_config(arch: ArchConfig) -> dict:
    """An HF-style config.json for arch, readable by weights/safetensors.HFCheckpoint."""
    names = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
             "phi3": "Phi3ForCausalLM"}
    cfg = {
        "architectures": [names[arch.architecture]], "model_type": arch.architecture,
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim, "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "attention_bias": arch.attention_bias, "bos_token_id": arch.bos_token_id,
        "eos_token_id": list(arch.eos_token_ids), "torch_dtype": "float32",
    }
    windows = [arch.window_of(i) for i in range(arch.num_layers)]
    types = ["sliding_attention" if w else "full_attention" for w in windows]
    rope = arch.rope_scaling.to_dict()  # weights/hf_arch.py reads it back (freq_factors is our own key)
    if arch.architecture == "gemma3":
        cfg.update(sliding_window=max(windows), rope_local_base_freq=arch.rope_theta_local,
                   query_pre_attn_scalar=arch.query_pre_attn_scalar, layer_types=types)
        if rope["rope_type"] != "default":
            cfg["rope_scaling"] = rope
    else:
        cfg["rope_parameters"] = {"rope_theta": arch.rope_theta, **rope}
    if arch.architecture == "gemma2":  # null caps: none (an absent key would mean Gemma2Config's default)
        cfg.update(sliding_window=max(windows) or None, query_pre_attn_scalar=arch.query_pre_attn_scalar,
                   layer_types=types, attn_logit_softcapping=arch.attn_logit_softcapping or None,
                   final_logit_softcapping=arch.final_logit_softcapping or None)
    elif arch.architecture == "phi3":
        cfg.update(sliding_window=max(windows) or None, attention_bias=False,
                   original_max_position_embeddings=arch.rope_scaling.original_max_position_embeddings or None,
                   partial_rotary_factor=(arch.rotary_dim or arch.head_dim) / arch.head_dim)
    if arch.architecture == "mistral":
        cfg["sliding_window"] = max(windows) or None
    elif arch.architecture in ("qwen2", "qwen3"):
        cfg.update(use_sliding_window=any(windows), sliding_window=max(windows) or None, layer_types=types)
    return cfg


def save_quantized(model: nn.Module, out: str | Path, meta: dict, tokenizer=None) -> Path:  # noqa: ANN001
    """Write model (already quantized) and its recipe `meta` to the directory out."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
    modules = {n: {"bits": m.bits, "group_size": m.group_size, "act_order": m.perm is not None,
                   "input_scale": m.input_scale is not None,
                   "scales_dtype": str(m.scales.dtype).split(".")[-1]}
               for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    doc = {"format": FORMAT, "version": 1, **meta, "modules": modules}
    (out / META).write_text(json.dumps(doc, indent=1))
    cfg = hf_config(model.arch)
    recipe = {k: meta[k] for k in ("method", "bits", "group_size") if k in meta}
    cfg["quantization_config"] = {"quant_method": "tuneserve", **recipe}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _module_for(name: str, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    cls = QuantEmbedding if name.split(".")[-1] == "embed_tokens" else QuantLinear
    get = tensors.get
    return cls(get(f"{name}.qweight"), get(f"{name}.scales"), get(f"{name}.mins"), get(f"{name}.bias"),
               get(f"{name}.perm"), get(f"{name}.input_scale"), get(f"{name}.qhigh"))


def load_quantized(model: nn.Module, path: str | Path) -> dict:
    """Fill an (uninitialised or fp32) model from a quantized checkpoint directory, in place."""
    kind = quant_kind(path)
    if kind in ("gptq", "awq"):
        from tuneserve.quant.hf_import import load_hf_quantized

        return load_hf_quantized(model, Path(path), kind)
    if kind != "tuneserve":
        raise ValueError(f"{path} is not a quantized checkpoint (no {META} or quantization_config)")
    from safetensors.torch import load_file

    meta = json.loads((Path(path) / META).read_text())
    tensors = load_file(str(Path(path) / "model.safetensors"))
    prefixes = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")})
    concat: dict[str, dict[int, QuantLinear]] = {}
    for name in prefixes:
        parent, _, idx = name.rpartition(".parts.")
        if parent and idx.isdigit():
            concat.setdefault(parent, {})[int(idx)] = _module_for(name, tensors)
        else:
            replace_module(model, name, _module_for(name, tensors))
    for name, parts in concat.items():
        replace_module(model, name, ConcatLinear([parts[i] for i in sorted(parts)]))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return {"checkpoint": str(path),
            **{k: meta.get(k) for k in ("method", "bits", "group_size", "calibration")}}
