"""Tiny random-weight HF checkpoints built in memory, with a byte-level tokenizer, for fast exact tests."""

from __future__ import annotations

from pathlib import Path

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
