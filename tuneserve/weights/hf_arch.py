"""config.json -> ArchConfig for the families we run, following what HF transformers' own classes read.

A key that changes the math is either computed or refused with a ValueError naming it and its value:
an engine may refuse a model, it must never serve one wrongly. Keys a family's HF class ignores are
ignored here too (equality with transformers is the contract).
"""

from __future__ import annotations

from tuneserve.config import ROPE_TYPES, ArchConfig, RopeScaling

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
GEMMA = ("gemma2", "gemma3")

# key -> the values that leave the math as we compute it (absent counts as None)
_NEUTRAL: dict[str, tuple] = {
    "partial_rotary_factor": (None, 1, 1.0),
    "attn_logit_softcapping": (None, 0, 0.0),
    "final_logit_softcapping": (None, 0, 0.0),
    "num_experts": (None, 0),
    "num_local_experts": (None, 0),
    "n_routed_experts": (None, 0),
    "num_experts_per_tok": (None, 0),
    "moe_intermediate_size": (None, 0),
    "mlp_bias": (None, False),
    "use_qk_norm": (None, False),
    "use_bidirectional_attention": (None, False),
    "shared_expert_intermediate_size": (None, 0),
}
# the _NEUTRAL keys a family computes (read by its own helper below); every other family refuses them
_IMPLEMENTED = {"gemma2": {"attn_logit_softcapping", "final_logit_softcapping"}, "phi3": {"partial_rotary_factor"},
                "mixtral": {"num_local_experts", "num_experts_per_tok"},
                "qwen2_moe": {"num_experts", "num_experts_per_tok", "moe_intermediate_size",
                              "shared_expert_intermediate_size"}}
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
# every rope parameter HF knows; freq_factors is ours (written by quant/checkpoint.py for GGUF rope_freqs)
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
              "attention_factor", "beta_fast", "beta_slow", "truncate", "mscale", "mscale_all_dim",
              "low_freq_factor", "high_freq_factor", "short_factor", "long_factor", "freq_factors"}


def refuse(where: str, key: str, value: object, why: str = "is not supported") -> ValueError:
    return ValueError(f"{where}: {key} = {value!r} {why}; refusing to serve a model we would compute differently")


def parse_rope(rp: dict, c: dict, max_pos: int, where: str, prefix: str = "rope_parameters",
               partial: bool = False) -> RopeScaling:
    """One rope_parameters / rope_scaling dict as HF standardizes it: `type` is the old `rope_type`, and a
    top-level original_max_position_embeddings (Phi-3 style) wins over the dict's own. partial: the
    caller computes partial_rotary_factor (else it is refused)."""
    for k, v in rp.items():
        if k not in _ROPE_KEYS:
            raise refuse(where, f"{prefix}.{k}", v, "is not a rope parameter we know")
    t = rp.get("rope_type") or rp.get("type") or "default"
    if t not in ROPE_TYPES:
        raise refuse(where, f"{prefix}.rope_type", t, f"is not supported (supported: {', '.join(ROPE_TYPES)})")
    if not partial and rp.get("partial_rotary_factor") not in _NEUTRAL["partial_rotary_factor"]:
        raise refuse(where, f"{prefix}.partial_rotary_factor", rp["partial_rotary_factor"])
    if t == "default":
        return RopeScaling()

    def need(key: str) -> object:
        if rp.get(key) is None:
            raise refuse(where, f"{prefix}.{key}", None, f"is required by rope_type {t!r}")
        return rp[key]

    def floats(key: str) -> tuple[float, ...]:
        return tuple(float(x) for x in rp.get(key) or ())

    kw: dict = {"rope_type": t}
    if t in ("yarn", "llama3", "longrope"):
        orig = c.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos
        kw["original_max_position_embeddings"] = orig = int(orig)
    if rp.get("freq_factors"):  # the divisors themselves (a GGUF's rope_freqs, saved by quant/checkpoint.py)
        return RopeScaling(freq_factors=floats("freq_factors"), **kw)
    if t in ("linear", "dynamic", "llama3"):
        kw["factor"] = float(need("factor"))
    elif t in ("yarn", "longrope"):  # without a factor HF uses the context extension ratio
        kw["factor"] = float(rp.get("factor") or max_pos / orig)
        if rp.get("attention_factor") is not None:
            kw["attention_factor"] = float(rp["attention_factor"])
    if t == "llama3":
        kw.update(low_freq_factor=float(need("low_freq_factor")), high_freq_factor=float(need("high_freq_factor")))
    if t == "yarn":
        kw.update(beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                  truncate=bool(rp.get("truncate", True)), mscale=float(rp.get("mscale") or 0),
                  mscale_all_dim=float(rp.get("mscale_all_dim") or 0))
    if t == "longrope":
        need("short_factor"), need("long_factor")
        kw.update(short_factor=floats("short_factor"), long_factor=floats("long_factor"))
    return RopeScaling(**kw)


def _check_keys(c: dict, family: str, where: str) -> str:
    """Refuse what we do not compute; returns our name of the MLP activation."""
    for key, ok in _NEUTRAL.items():
        if c.get(key) not in ok and key not in _IMPLEMENTED.get(family, ()):
            raise refuse(where, key, c[key])
    gemma = family in GEMMA
    act_key = "hidden_activation" if gemma else "hidden_act"
    act = c.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if _ACTS.get(act) != ("gelu_tanh" if gemma else "silu"):
        raise refuse(where, act_key, act)
    return _ACTS[act]


def _layer_types(c: dict, default: list[str], layers: int, where: str) -> list[str]:
    types = c.get("layer_types") or default
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        raise refuse(where, "layer_types", types, f"must name {layers} full_attention / sliding_attention layers")
    return types


def _qwen_windows(c: dict, layers: int, where: str) -> tuple[int, ...]:
    """Qwen2 / Qwen3: a window only with use_sliding_window, on the layers layer_types marks sliding
    (by default those from max_window_layers on)."""
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    types = _layer_types(c, ["sliding_attention" if window and i >= c.get("max_window_layers", 28)
                             else "full_attention" for i in range(layers)], layers, where)
    if "sliding_attention" in types and not window:
        raise refuse(where, "layer_types", types, "marks sliding layers without use_sliding_window/sliding_window")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types) if window else ()


def _gemma3(c: dict, layers: int, head_dim: int, max_pos: int, where: str) -> dict:
    """Sliding layers (window, own rope base, never scaled) and global ones (HF: `rope_scaling`, or
    transformers 5's rope_parameters nested per layer type)."""
    window = c.get("sliding_window") or 512
    every = c.get("sliding_window_pattern") or 6  # older configs: every n-th layer is global
    types = _layer_types(c, ["full_attention" if (i + 1) % every == 0 else "sliding_attention"
                             for i in range(layers)], layers, where)
    rope = c.get("rope_parameters") or {}
    full = dict(rope.get("full_attention") or {}, **(c.get("rope_scaling") or {}))
    local = rope.get("sliding_attention") or {}
    local_type = local.get("rope_type") or local.get("type") or "default"
    if local_type != "default":
        raise refuse(where, "rope_parameters.sliding_attention.rope_type", local_type, "(scaled sliding layers)")
    theta = full.get("rope_theta") or c.get("rope_theta") or rope.get("rope_theta") or 10000.0
    return dict(layer_windows=tuple(window if t == "sliding_attention" else 0 for t in types),
                rope_theta=float(theta),
                rope_theta_local=float(local.get("rope_theta") or c.get("rope_local_base_freq", 10000.0)),
                rope_scaling=parse_rope(full, c, max_pos, where, "rope_parameters.full_attention"),
                query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", head_dim)))


def _gemma2(c: dict, layers: int, where: str) -> dict:
    """Every other layer sliding (layer 0 first) unless layer_types says; Gemma2Config's defaults where a
    key is absent (window 4096, query_pre_attn_scalar 256, soft caps 50 and 30; null: no cap)."""
    window = c.get("sliding_window", 4096)
    types = _layer_types(c, ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
                         layers, where)
    if "sliding_attention" in types and not window:
        raise refuse(where, "sliding_window", window, "with sliding layers in layer_types")
    return dict(layer_windows=tuple(int(window) if t == "sliding_attention" else 0 for t in types),
                query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
                attn_logit_softcapping=float(c.get("attn_logit_softcapping", 50.0) or 0.0),
                final_logit_softcapping=float(c.get("final_logit_softcapping", 30.0) or 0.0))


def _phi3(c: dict, layers: int, head_dim: int, max_pos: int, where: str) -> dict:
    """Phi3Config's reading: rope type su or yarn means longrope and any other but default is an error;
    partial_rotary_factor (the rope dict's, else the top level's) rotates each head's first dims;
    original_max_position_embeddings defaults to 4096; the window on every layer; no biases."""
    key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    rp = dict(c.get(key) or {})
    t = rp.pop("type", None) or rp.get("rope_type") or "default"
    t = "longrope" if t in ("su", "yarn") else t
    if t not in ("default", "longrope"):
        raise refuse(where, f"{key}.rope_type", t, "is not a Phi-3 rope type (default, longrope, su)")
    factor = rp.get("partial_rotary_factor")
    factor = float(c.get("partial_rotary_factor", 1.0) if factor is None else factor)
    rot = int(head_dim * factor)
    if rot <= 0 or rot % 2:
        raise refuse(where, "partial_rotary_factor", factor, f"(rotates {rot} of {head_dim} dims, not an even count)")
    orig = {"original_max_position_embeddings": c.get("original_max_position_embeddings") or 4096}
    window = c.get("sliding_window")
    return dict(rope_theta=float(rp.get("rope_theta") or c.get("rope_theta") or 10000.0),
                rope_scaling=parse_rope({**rp, "rope_type": t}, {**c, **orig}, max_pos, where, key, partial=True),
                rotary_dim=0 if rot == head_dim else rot, layer_windows=(int(window),) * layers if window else (),
                attention_bias=False, attention_out_bias=False)


def _moe(c: dict, family: str, layers: int, where: str) -> dict:
    """Experts, as MixtralConfig / Qwen2MoeConfig read them (their defaults where a key is absent). Qwen2-MoE's
    dense layers (mlp_only_layers, decoder_sparse_step) are refused: every layer must be sparse."""
    if family == "mixtral":
        return dict(num_experts=int(c.get("num_local_experts", 8)), norm_topk_prob=True,
                    num_experts_per_tok=int(c.get("num_experts_per_tok", 2)),
                    moe_intermediate_size=int(c["intermediate_size"]))
    if c.get("mlp_only_layers"):
        raise refuse(where, "mlp_only_layers", c["mlp_only_layers"], "(dense layers among sparse ones)")
    if c.get("decoder_sparse_step", 1) != 1:
        raise refuse(where, "decoder_sparse_step", c["decoder_sparse_step"], "(dense layers among sparse ones)")
    bias = bool(c.get("qkv_bias", True))
    return dict(num_experts=int(c.get("num_experts", 60)), num_experts_per_tok=int(c.get("num_experts_per_tok", 4)),
                moe_intermediate_size=int(c.get("moe_intermediate_size", 1408)),
                norm_topk_prob=bool(c.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(c.get("shared_expert_intermediate_size", 5632)),
                attention_bias=bias, attention_out_bias=False, layer_windows=_qwen_windows(c, layers, where))


def arch_from_hf(c: dict, where: str) -> ArchConfig:
    """The ArchConfig of an HF config.json (multimodal wrappers already merged with their text_config)."""
    names = c.get("architectures") or []
    family = next((FAMILIES[n] for n in names if n in FAMILIES), None)
    if family is None:
        raise ValueError(f"{where}: architectures {names} not supported; supported: {sorted(FAMILIES)}")
    act = _check_keys(c, family, where)
    heads, layers = c["num_attention_heads"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or (256 if family == "gemma2" else c["hidden_size"] // heads)
    max_pos = c.get("max_position_embeddings", 2048)
    bias = bool(c.get("attention_bias", False))  # llama, qwen3, gemma3: q, k, v and o
    kw: dict = dict(attention_bias=bias, attention_out_bias=bias)
    if family == "gemma3":
        kw.update(_gemma3(c, layers, head_dim, max_pos, where))
    elif family == "phi3":
        kw.update(_phi3(c, layers, head_dim, max_pos, where))
    else:
        key = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"  # HF: rope_scaling wins when both
        rp = c.get(key) or {}
        kw.update(rope_theta=float(rp.get("rope_theta") or c.get("rope_theta") or 10000.0),
                  rope_scaling=parse_rope(rp, c, max_pos, where, key))
    if family in ("mixtral", "qwen2_moe"):
        kw.update(_moe(c, family, layers, where))
    if family in ("mistral", "mixtral"):  # HF: no biases; a window on every layer (Mistral's default 4096)
        window = c.get("sliding_window", 4096 if family == "mistral" else None)
        kw.update(attention_bias=False, attention_out_bias=False,
                  layer_windows=(int(window),) * layers if window else ())
    elif family == "gemma2":
        kw.update(_gemma2(c, layers, where))
    elif family in ("qwen2", "qwen3"):
        kw["layer_windows"] = _qwen_windows(c, layers, where)
        if family == "qwen2":  # HF hard-codes q/k/v biases and none on o
            kw.update(attention_bias=True, attention_out_bias=False)
    eos = c.get("eos_token_id")
    return ArchConfig(
        architecture=family,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(c.get("tie_word_embeddings", family in GEMMA)),
        hidden_act=act,
        qk_norm=family == "qwen3",
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        **kw,
    )
