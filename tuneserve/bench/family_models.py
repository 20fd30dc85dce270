"""Random-weight models of every served family at a chosen scale, for speed figures (`bench families`).

Each is built with transformers' own config and model classes (so HF transformers runs the very model we
serve) and saved as an HF directory: fp32 safetensors and a word-level tokenizer covering the vocabulary.
The shapes: `hidden` wide, `layers` deep, heads of 64 dims (at least 2 heads, half as many KV heads), a
dense MLP 4 x hidden, vocabulary 32000; each family keeps what makes it itself (llama3 rope, q/k/v biases,
q/k norms, soft-capping, sliding layers, fused Phi-3 tensors, routed and shared experts). At hidden 1024 and
24 layers the dense families have 0.41-0.44B parameters, Mixtral (8 experts of 1024, top 2) 0.75B with
0.29B active and Qwen2-MoE (16 experts of 512, top 4, a shared expert of 2048) 0.90B with 0.44B active.
Weights keep transformers' own initialisation (normal, std 0.02): speed does not depend on their values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral", "qwen2_moe")
BOS, EOS, PAD = 0, 1, 2
# Llama 3.2's rope: base 500000, llama3 scaling of the 8192-token original context by 32
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Shape:
    """The scale every family is built at."""

    hidden: int = 1024
    layers: int = 24
    vocab: int = 32000

    @property
    def heads(self) -> int:
        return max(2, self.hidden // 64)

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // 2)


def family_config(family: str, shape: Shape) -> Any:  # noqa: ANN401 - a transformers PretrainedConfig
    """transformers' config of `family` at `shape`."""
    import transformers

    h = shape.hidden
    rope = {"rope_type": "default", "rope_theta": 1e6}
    own: dict[str, tuple[str, dict]] = {
        "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE,
                                      max_position_embeddings=131072)),
        "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters=rope)),
        "qwen3": ("Qwen3Config", dict(tie_word_embeddings=True, rope_parameters=rope)),
        "mistral": ("MistralConfig", dict(tie_word_embeddings=False, sliding_window=4096)),
        "gemma2": ("Gemma2Config", dict(tie_word_embeddings=True, sliding_window=4096, query_pre_attn_scalar=64)),
        "gemma3": ("Gemma3TextConfig", dict(tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=64)),
        "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
        "mixtral": ("MixtralConfig", dict(tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=2,
                                          intermediate_size=h, sliding_window=None)),
        "qwen2_moe": ("Qwen2MoeConfig", dict(tie_word_embeddings=False, num_experts=16, num_experts_per_tok=4,
                                             moe_intermediate_size=h // 2, shared_expert_intermediate_size=2 * h,
                                             rope_parameters=rope)),
    }
    if family not in own:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    cls, extra = own[family]
    base = dict(vocab_size=shape.vocab, hidden_size=h, intermediate_size=4 * h, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=h // shape.heads,
                max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    cfg = getattr(transformers, cls)(**{**base, **extra})
    if family == "gemma3":
        cfg.architectures = ["Gemma3ForCausalLM"]  # the text-only model (tuneserve reads the architecture)
    return cfg


def word_tokenizer(vocab: int) -> Any:  # noqa: ANN401 - a transformers PreTrainedTokenizerFast
    """A tokenizer with one word per id ('t3', 't4', ...) after the three specials: any id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>"]
    words = {s: i for i, s in enumerate(specials)} | {f"t{i}": i for i in range(len(specials), vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


@dataclass(frozen=True)
class BuiltFamily:
    """A saved random model: where, and its parameters (active: those one token computes with)."""

    family: str
    path: Path
    params: int
    active_params: int


def build_family_model(family: str, path: Path, shape: Shape, seed: int = 0) -> BuiltFamily:
    """Build `family` at `shape` with random weights and save it (fp32 safetensors + tokenizer) to path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = family_config(family, shape)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    params, active = count_params(model, cfg)
    model.save_pretrained(path, safe_serialization=True)
    word_tokenizer(shape.vocab).save_pretrained(path)
    return BuiltFamily(family, Path(path), params, active)


def count_params(model: Any, cfg: Any) -> tuple[int, int]:  # noqa: ANN401 - transformers model and config
    """(all parameters, those one token computes with): a routed expert counts top-k / experts of its share;
    tied embeddings count once."""
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    total = routed = 0
    for name, p in model.named_parameters():  # tied weights are listed once
        total += p.numel()
        if "experts" in name.split("."):
            routed += p.numel()
    active = total - routed + (routed * cfg.num_experts_per_tok // experts if experts else 0)
    return total, active
