"""Reading Hugging Face model directories: config.json plus *.safetensors shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tuneserve.config import ArchConfig
from tuneserve.weights.hf_arch import arch_from_hf


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
        """Architecture hyper-parameters from config.json (weights/hf_arch.py)."""
        return arch_from_hf(self.config, str(self.path))

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
