"""Reading Hugging Face model directories: config.json plus *.safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tuneserve.config import ArchConfig

_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}


class HFCheckpoint:
    """An HF model directory (config.json + safetensors)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        if "text_config" in self.config:  # multimodal wrappers keep the language model here
            self.config = {**self.config, **self.config["text_config"]}
        self.files = sorted(self.path.glob("*.safetensors"))
        if not self.files:
            raise ValueError(f"{self.path} has a config.json but no *.safetensors weights")

    def arch_config(self) -> ArchConfig:
        """Architecture hyper-parameters from config.json."""
        c = self.config
        names = c.get("architectures") or []
        arch = next((_ARCHS[n] for n in names if n in _ARCHS), None)
        if arch is None:
            raise ValueError(f"{self.path}: architectures {names} not supported; supported: {sorted(_ARCHS)}")
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        rope = c.get("rope_parameters") or {}
        theta = c.get("rope_theta") or rope.get("rope_theta") or 10000.0
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        windows: tuple[int, ...] = ()
        kw = {}
        if arch == "gemma3":
            window = c.get("sliding_window") or 512
            types = c.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                             for i in range(c["num_hidden_layers"])]
            windows = tuple(window if t == "sliding_attention" else 0 for t in types)
            # transformers 5 nests rope settings per layer type; older configs use rope_local_base_freq
            full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
            scaled = any(r.get("rope_type", "default") != "default" for r in (full, local))
            if c.get("rope_scaling") or scaled:
                raise ValueError(f"{self.path}: gemma3 rope scaling is not supported: "
                                 f"{c.get('rope_scaling') or rope}")
            theta = full.get("rope_theta") or theta
            local_theta = local.get("rope_theta") or c.get("rope_local_base_freq", 10000.0)
            kw = dict(rope_theta_local=float(local_theta), hidden_act="gelu_tanh",
                      query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", head_dim)))
        return ArchConfig(
            architecture=arch,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", arch == "gemma3")),
            attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
            layer_windows=windows,
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **kw,
        )

    def tensors(self, progress: bool = True) -> Iterator[tuple[str, np.ndarray | torch.Tensor]]:
        """(name, tensor) for every weight in every shard."""
        from safetensors import safe_open

        for f in tqdm(self.files, desc=f"loading {self.path.name}", unit="shard", disable=not progress,
                      leave=False):
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    if name.startswith("model.language_model."):
                        yield "model." + name[len("model.language_model."):], sf.get_tensor(name)
                    else:
                        yield name, sf.get_tensor(name)
