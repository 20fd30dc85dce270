"""Tiny random-weight HF checkpoints built in memory, with a byte-level tokenizer, for fast exact tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

SPECIALS = ["<bos>", "<eos>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<bos>assistant: {% endif %}")


def byte_tokenizer(extra_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: ids 0-2 special, 3..258 the 256 byte symbols, no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS + list(extra_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny(path: Path, arch: str = "llama", seed: int = 0, layers: int = 2, std: float = 0.25,
               extra_tokens: tuple[str, ...] = ()) -> Path:
    """Save a random tiny model of the given family (llama or qwen2) with its tokenizer to path."""
    torch.manual_seed(seed)
    tok = byte_tokenizer(tuple(extra_tokens))
    common = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  initializer_range=std)
    if arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=True, **common)
    else:
        cfg = Qwen2Config(tie_word_embeddings=False, **common)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # make biases and norms non-trivial so loading them wrongly fails the tests
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, std)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def build_tiny_gemma3(path: Path, seed: int = 0, layers: int = 6, window: int = 32,
                      std: float = 0.02) -> Path:
    """A random tiny Gemma 3 (every 6th layer global, the rest sliding over `window` tokens) to path."""
    from transformers import Gemma3TextConfig

    torch.manual_seed(seed)
    tok = byte_tokenizer()
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    cfg = Gemma3TextConfig(
        vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=window, layer_types=types, max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=std, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    cfg.architectures = ["Gemma3ForCausalLM"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # gemma multiplies by (1 + w): random w so a missed "+1" fails the tests
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# ----- the model families of tests/test_families.py, as HF directories and llama.cpp-style GGUF files -----
FAMILY_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen3": "Qwen3Config",
                  "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "phi3": "Phi3Config",
                  "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig"}


def build_family(path: Path, family: str, rope: dict | None = None, seed: int = 0, std: float = 0.25,
                 layers: int = 2, max_pos: int = 256, tie: bool = True, embed_scale: float = 1.0, **extra) -> Path:
    """A random tiny model of `family` built with transformers' own config and model classes, saved to path.
    `rope` is its rope_parameters (rope_theta 10000 unless given); `extra` more config keys. embed_scale
    multiplies the embeddings (gemma's sqrt(hidden)-scaled tied ones otherwise make a model that repeats
    its last token whatever the layers compute)."""
    import transformers

    torch.manual_seed(seed)
    cfg_cls = getattr(transformers, FAMILY_CONFIGS[family])
    rope_parameters = {"rope_theta": 10000.0, "rope_type": "default", **(rope or {})}
    if family == "gemma3":  # per layer type: the scaling applies to the global layers
        rope_parameters = {"full_attention": rope_parameters,
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}
    base = dict(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos, rms_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=std, tie_word_embeddings=tie,
                rope_parameters=rope_parameters)
    cfg = cfg_cls(**{**base, **extra})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial biases and norms: loading them wrongly must fail the tests
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, std)
            elif "norm" in name:  # gemma multiplies by (1 + w)
                p.uniform_(-0.5, 0.5) if family.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif "embed_tokens" in name:
                p.mul_(embed_scale)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Phi3ForCausalLM": "phi3",
             "MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe"}
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv",
              "mlp.gate_up_proj": "ffn_up", "pre_feedforward_layernorm": "ffn_norm",
              "post_feedforward_layernorm": "post_ffw_norm"}
GGUF_GEMMA_LAYER = {**GGUF_LAYER, "post_attention_layernorm": "post_attention_norm"}


def _llama3_rope_freqs(rp: dict, head_dim: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's convert_hf_to_gguf.py stores as rope_freqs.weight."""
    import math

    freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    orig, factor = rp["original_max_position_embeddings"], rp["factor"]
    lo, hi = rp["low_freq_factor"], rp["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < orig / hi:
            out.append(1.0)
        elif wavelen > orig / lo:
            out.append(factor)
        else:
            smooth = (orig / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


_EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def _stack_experts(state: dict, experts: int, out: dict) -> dict:
    """Mixtral's / Qwen2-MoE's per-expert tensors stacked into llama.cpp's ffn_*_exps (E, out, in), the router as
    ffn_gate_inp and the shared expert as *_shexp (written to `out`); returns the remaining tensors."""
    rest, stacks = {}, {}
    for name, t in state.items():
        parts = name.split(".")
        if ".experts." in name:  # model.layers.L.{mlp|block_sparse_moe}.experts.E.PART.weight
            layer, e, part = parts[2], int(parts[5]), parts[6]
            stacks.setdefault((layer, _EXPERT_PARTS[part]), [None] * experts)[e] = t
        elif parts[3:5] in (["mlp", "gate"], ["block_sparse_moe", "gate"]):
            out[f"blk.{parts[2]}.ffn_gate_inp.weight"] = t
        elif parts[4:5] == ["shared_expert"]:
            out[f"blk.{parts[2]}.ffn_{_EXPERT_PARTS[parts[5]]}_shexp.weight"] = t
        elif parts[4:5] == ["shared_expert_gate"]:
            out[f"blk.{parts[2]}.ffn_gate_inp_shexp.weight"] = t.reshape(-1)
        else:
            rest[name] = t
    for (layer, part), ts in stacks.items():
        out[f"blk.{layer}.ffn_{part}_exps.weight"] = np.stack(ts)
    return rest


def write_gguf(hf_dir: Path, out: Path, extra_meta: dict | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None, qtype: str | None = None) -> Path:
    """The HF model at hf_dir as an fp32 GGUF file laid out as llama.cpp writes it: its tensor names, q/k rows
    permuted for llama-arch files, rope scaling as metadata or factor tensors. extra_*: added as given.
    qtype (e.g. "Q8_0"): the matrices in that ggml type instead."""
    import gguf
    from safetensors.numpy import load_file

    c = json.loads((hf_dir / "config.json").read_text())
    a = GGUF_ARCH[c["architectures"][0]]
    heads, kv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    hd = c.get("head_dim") or hidden // heads
    rp = c["rope_parameters"]
    rot = int(hd * rp.get("partial_rotary_factor", 1.0))
    w = gguf.GGUFWriter(str(out), a)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(rot)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_vocab_size(c["vocab_size"])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    if c["architectures"][0] in ("MistralForCausalLM", "MixtralForCausalLM") and c.get("sliding_window"):
        w.add_sliding_window(c["sliding_window"])
    if a == "gemma2":  # as llama.cpp's Gemma2Model writes it
        w.add_sliding_window(c["sliding_window"])
        w.add_attn_logit_softcapping(c["attn_logit_softcapping"])
        w.add_final_logit_softcapping(c["final_logit_softcapping"])
    experts = c.get("num_local_experts") or c.get("num_experts")
    if experts:  # as llama.cpp's MixtralModel / Qwen2MoeModel write them
        w.add_expert_count(experts)
        w.add_expert_used_count(c["num_experts_per_tok"])
        if a == "qwen2moe":
            w.add_expert_feed_forward_length(c["moe_intermediate_size"])
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    if a == "phi3":  # as llama.cpp's Phi3MiniModel writes it: 0 for no window, the original context always
        w.add_sliding_window(c.get("sliding_window") or 0)
        w.add_rope_scaling_orig_ctx_len(c["original_max_position_embeddings"])
    tensors = {}
    kind = rp.get("rope_type", "default")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rp["factor"])
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    elif kind == "llama3":
        tensors["rope_freqs.weight"] = _llama3_rope_freqs(rp, hd)
    elif kind == "longrope":  # as for Phi-3: the factor tensors and the attention factor
        import math

        orig = rp["original_max_position_embeddings"]
        scale = c["max_position_embeddings"] / orig
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        if a != "phi3":
            w.add_rope_scaling_orig_ctx_len(orig)
        tensors["rope_factors_long.weight"] = np.array(rp["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rp["short_factor"], dtype=np.float32)
    for key, value in (extra_meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, value)
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    if experts:
        state = _stack_experts(state, experts, tensors)
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    for name, t in state.items():
        if a == "gemma2" and name.endswith("norm.weight"):  # llama.cpp's Gemma2Model adds gemma's 1 to norms
            t = t + 1
        if name in globals_:
            tensors[globals_[name]] = t
            continue
        _, _, layer, rest = name.split(".", 3)
        part, kind_ = rest.rsplit(".", 1)
        if a == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):  # llama.cpp's LlamaModel.permute
            n = heads if part == "self_attn.q_proj" else kv
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        tensors[f"blk.{layer}.{(GGUF_GEMMA_LAYER if a == 'gemma2' else GGUF_LAYER)[part]}.{kind_}"] = t
    tensors.update(extra_tensors or {})
    for name, t in tensors.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype and t.ndim >= 2 and "gate_inp" not in name:  # llama.cpp keeps routers in fp32
            kind = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(t, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def build_models(root: Path, models: dict) -> dict[str, dict]:
    """{name: (family, rope, build_family kwargs, paths)} -> {name: {"hf": dir, "gguf": file or None}}."""
    out = {}
    for name, (family, rope, kw, paths) in models.items():
        d = build_family(root / name, family, rope, **kw)
        out[name] = {"hf": d, "gguf": write_gguf(d, root / f"{name}.gguf") if "gguf" in paths else None}
    return out


def round_trip_configs(d: dict):  # noqa: ANN201 - (ArchConfig, ArchConfig | None)
    """A built model's architecture read from its HF directory and from its GGUF file (None without one),
    each checked to survive quant/checkpoint.py's hf_config, which writes it back for a quantized save."""
    from tuneserve.quant.checkpoint import hf_config
    from tuneserve.weights import open_checkpoint
    from tuneserve.weights.hf_arch import arch_from_hf

    archs = [open_checkpoint(d[k]).arch_config() if d[k] is not None else None for k in ("hf", "gguf")]
    for a in archs:
        assert a is None or arch_from_hf(hf_config(a), "x") == a
    return archs[0], archs[1]


def build_tiny_chat(path: Path, template: str, arch: str = "llama", added_tokens: tuple[str, ...] = ()) -> Path:
    """A tiny model (build_tiny) with its own chat template, and `added_tokens` as plain added tokens: whole
    tokens that stay in the decoded text, as Qwen2.5's <tool_call> tags are."""
    from transformers import AutoTokenizer

    build_tiny(path, arch)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(list(added_tokens))
    tok.chat_template = template
    tok.save_pretrained(path)
    return path
