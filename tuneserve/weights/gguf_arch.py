"""GGUF metadata -> ArchConfig, read the way llama.cpp writes it (convert_hf_to_gguf.py).

Every `{arch}.*` key is either understood here or refused with a ValueError naming it and its value, so
a file carrying something we would not compute (experts, softcapping, another rope scaling) is never
served as if it were plain llama. Rope scaling: `rope.scaling.type` linear / yarn, the llama3
per-frequency divisors as the `rope_freqs` tensor, longrope as `rope_factors_long` / `rope_factors_short`.
Mistral files use arch `llama`; one with a sliding window becomes our "mistral".

Gemma 2: every other layer slides (layer 0 first) over `attention.sliding_window`; soft caps default to
llama.cpp's 50 / 30 where absent. Gemma 2 and 3: the attention scale is 1/sqrt(head_dim), except for
the 27B models (46 and 62 layers), where llama.cpp (after gemma_pytorch) uses 1/sqrt(hidden / heads).
Phi-3: `rope.dimension_count` below head_dim is partial rotary; a sliding window applies to every layer,
as HF applies Phi-3's (llama.cpp currently ignores it; a window of 0 means none, as in Phi-4 files).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tuneserve.config import ArchConfig, RopeScaling
from tuneserve.weights.hf_arch import refuse

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "qwen2moe")
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_KNOWN = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
          "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
          "attention.key_length", "attention.value_length", "attention.sliding_window", "rope.freq_base",
          "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
          "rope.scaling.attn_factor", "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow",
          "rope.scaling.finetuned"}
_MOE = {"expert_count", "expert_used_count"}
# keys only these compute (llama: Mixtral, as llama.cpp converts it)
_KNOWN_BY_ARCH = {"gemma2": {"attn_logit_softcapping", "final_logit_softcapping"}, "llama": _MOE,
                  "qwen2moe": _MOE | {"expert_feed_forward_length", "expert_shared_feed_forward_length",
                                      "expert_weights_norm"}}
_NEUTRAL = {"expert_count": (0,), "expert_used_count": (0,)}  # keys harmless only at these values
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _check_keys(meta: dict, a: str, where: str) -> None:
    for key, value in meta.items():
        sub = key[len(a) + 1:] if key.startswith(a + ".") else None
        if sub is None or sub in _KNOWN or sub in _KNOWN_BY_ARCH.get(a, ()) or value in _NEUTRAL.get(sub, ()):
            continue
        raise refuse(where, key, value)


def _rope(meta: dict, a: str, names: set[str], read: Callable[[str], np.ndarray], head_dim: int,
          where: str) -> RopeScaling:
    """The rope scaling of the file; head_dim: of the rotated part."""
    def get(sub: str) -> object:
        return meta.get(f"{a}.rope.scaling.{sub}")

    def factors(name: str) -> tuple[float, ...]:
        f = read(name).reshape(-1)
        if f.size != head_dim // 2:
            raise refuse(where, name, f"{f.size} values", f"(expected head_dim / 2 = {head_dim // 2})")
        return tuple(float(x) for x in f)

    kind = str(get("type") or "none")
    ctx = int(meta[f"{a}.context_length"])
    orig = int(get("original_context_length") or ctx)
    long_short = {"rope_factors_long.weight", "rope_factors_short.weight"} & names
    if "rope_freqs.weight" in names:  # llama3: the divisors precomputed
        if kind != "none" or long_short:
            raise refuse(where, f"{a}.rope.scaling.type", kind, "together with a rope_freqs tensor")
        if float(get("factor") or 1.0) != 1.0:  # llama.cpp would scale on top of the divisors
            raise refuse(where, f"{a}.rope.scaling.factor", get("factor"), "together with a rope_freqs tensor")
        return RopeScaling(rope_type="llama3", original_max_position_embeddings=orig,
                           freq_factors=factors("rope_freqs.weight"))
    if long_short or kind == "longrope":
        if len(long_short) != 2 or kind not in ("none", "longrope"):
            raise refuse(where, f"{a}.rope.scaling.type", kind, f"with rope factor tensors {sorted(long_short)}")
        att = get("attn_factor")
        return RopeScaling(rope_type="longrope", factor=ctx / orig, original_max_position_embeddings=orig,
                           attention_factor=None if att is None else float(att),
                           long_factor=factors("rope_factors_long.weight"),
                           short_factor=factors("rope_factors_short.weight"))
    if get("attn_factor") is not None:  # llama.cpp multiplies it into yarn's own factor; HF's replaces it
        raise refuse(where, f"{a}.rope.scaling.attn_factor", get("attn_factor"), f"with rope scaling {kind!r}")
    factor = float(get("factor") or 1.0)
    if kind == "none":
        if factor != 1.0:
            raise refuse(where, f"{a}.rope.scaling.factor", factor, "without a rope.scaling.type")
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(rope_type="linear", factor=factor)
    if kind == "yarn":
        return RopeScaling(rope_type="yarn", factor=factor, original_max_position_embeddings=orig,
                           beta_fast=float(get("yarn_beta_fast") or 32), beta_slow=float(get("yarn_beta_slow") or 1))
    raise refuse(where, f"{a}.rope.scaling.type", kind, "is not supported (none, linear, yarn, longrope)")


def _experts(m: dict, a: str, names: set[str], where: str) -> dict:
    """Mixtral (arch llama) or Qwen2-MoE, as llama.cpp writes them: stacked expert tensors, the experts'
    size in feed_forward_length (Mixtral) or expert_feed_forward_length; Qwen2-MoE's routing weights are not
    renormalized unless expert_weights_norm says so."""
    n = int(m[f"{a}.expert_count"])
    if "blk.0.ffn_gate_exps.weight" not in names:
        raise refuse(where, f"{a}.expert_count", n, "without stacked expert tensors (blk.N.ffn_*_exps)")
    kw = dict(num_experts=n, num_experts_per_tok=int(m[f"{a}.expert_used_count"]))
    if a == "llama":
        return dict(kw, moe_intermediate_size=int(m[f"{a}.feed_forward_length"]), norm_topk_prob=True)
    return dict(kw, moe_intermediate_size=int(m[f"{a}.expert_feed_forward_length"]),
                shared_expert_intermediate_size=int(m.get(f"{a}.expert_shared_feed_forward_length") or 0),
                norm_topk_prob=bool(m.get(f"{a}.expert_weights_norm", False)))


def arch_from_gguf(meta: dict, names: set[str], read: Callable[[str], np.ndarray], vocab: Callable[[], int],
                   where: str) -> ArchConfig:
    """ArchConfig from GGUF metadata; `read` loads a small tensor by name, `vocab` counts the tokenizer's."""
    a = str(meta["general.architecture"])
    if a not in ARCHS:
        raise ValueError(f"{where}: architecture {a!r} is not supported ({', '.join(ARCHS)})")
    _check_keys(meta, a, where)
    m = meta
    hidden = int(m[f"{a}.embedding_length"])
    heads = int(m[f"{a}.attention.head_count"])
    head_dim = int(m.get(f"{a}.attention.key_length") or hidden // heads)
    rot = int(m.get(f"{a}.rope.dimension_count") or head_dim)
    v_len = f"{a}.attention.value_length"
    if m.get(v_len) not in (None, head_dim):  # odd v heads
        raise refuse(where, v_len, m[v_len], f"(head_dim is {head_dim})")
    if rot != head_dim and not (a == "phi3" and 0 < rot < head_dim and rot % 2 == 0):  # partial rotary: phi3's
        raise refuse(where, f"{a}.rope.dimension_count", rot, f"(head_dim is {head_dim})")
    layers = int(m[f"{a}.block_count"])
    window = int(m.get(f"{a}.attention.sliding_window") or 0)
    family = {"mistral": "llama", "qwen2moe": "qwen2"}.get(a, a)
    windows: tuple[int, ...] = ()
    kw: dict = {}
    if a in ("gemma2", "gemma3"):
        scalar = hidden // heads if layers == _GEMMA_27B_LAYERS[a] else head_dim
        kw = dict(hidden_act="gelu_tanh", query_pre_attn_scalar=float(scalar))
    if a == "gemma3":
        # every 6th layer is global (5, 11, 17, ...); the pattern is not in the GGUF
        windows = tuple(0 if (i + 1) % 6 == 0 else (window or 512) for i in range(layers))
        kw.update(rope_theta_local=10000.0)
    elif a == "gemma2":  # every other layer global (1, 3, 5, ...); llama.cpp's default caps where absent
        if not window:
            raise refuse(where, f"{a}.attention.sliding_window", m.get(f"{a}.attention.sliding_window"),
                         "(gemma2 slides every other layer)")
        windows = tuple(0 if i % 2 else window for i in range(layers))
        kw.update(attn_logit_softcapping=float(m.get(f"{a}.attn_logit_softcapping", 50.0)),
                  final_logit_softcapping=float(m.get(f"{a}.final_logit_softcapping", 30.0)))
    elif a == "phi3":
        windows = (window,) * layers if window else ()
        kw = dict(rotary_dim=0 if rot == head_dim else rot)
    elif window and family == "llama":  # mistral: the window on every layer
        family, windows = "mistral", (window,) * layers
    elif window:
        raise refuse(where, f"{a}.attention.sliding_window", window, "(which layers slide is not in the file)")
    if m.get(f"{a}.expert_count"):
        family = "mixtral" if a == "llama" else "qwen2_moe"
        kw.update(_experts(m, a, names, where))
    eos = [m.get("tokenizer.ggml.eos_token_id"), m.get("tokenizer.ggml.eot_token_id")]
    return ArchConfig(
        architecture=family,
        vocab_size=int(m.get(f"{a}.vocab_size") or vocab()),
        hidden_size=hidden,
        intermediate_size=int(m[f"{a}.feed_forward_length"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(m.get(f"{a}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(m[f"{a}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(m.get(f"{a}.rope.freq_base") or 10000.0),
        max_position_embeddings=int(m[f"{a}.context_length"]),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        attention_out_bias="blk.0.attn_output.bias" in names,
        qk_norm=a == "qwen3",
        layer_windows=windows,
        rope_scaling=_rope(m, a, names, read, rot, where),
        bos_token_id=m.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(sorted({int(e) for e in eos if e is not None})),
        **kw,
    )
