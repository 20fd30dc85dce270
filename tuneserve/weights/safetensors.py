"""Reading Hugging Face model directories: config.json plus *.safetensors shards.

Gemma (2 and 3) RMS norms multiply by (1 + w) where HF checkpoints store w; the tensors come out with the
1 added, as GGUF files store them, so one model computes both."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tuneserve.config import ArchConfig
from tuneserve.weights.hf_arch import FAMILIES, arch_from_hf

GEMMA_NORMS = ("gemma2", "gemma3")  # families whose norms multiply by (1 + w)


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
        family = next((FAMILIES[n] for n in self.config.get("architectures") or [] if n in FAMILIES), None)
        self.norms_add_one = family in GEMMA_NORMS

    def arch_config(self) -> ArchConfig:
        """Architecture hyper-parameters from config.json (weights/hf_arch.py)."""
        return arch_from_hf(self.config, str(self.path))

    def tensors(self, progress: bool = True) -> Iterator[tuple[str, np.ndarray | torch.Tensor]]:
        """(name, tensor) for every weight in every shard (gemma norms with their 1 added)."""
        from safetensors import safe_open

        for f in tqdm(self.files, desc=f"loading {self.path.name}", unit="shard", disable=not progress,
                      leave=False):
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    if self.norms_add_one and name.endswith("norm.weight"):
                        t = t.float() + 1  # in fp32, as HF computes it (a bf16 sum would round)
                    if name.startswith("model.language_model."):
                        yield "model." + name[len("model.language_model."):], t
                    else:
                        yield name, t
