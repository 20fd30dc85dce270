"""Build a model for a resolved checkpoint and fill it with the checkpoint's weights (unquantized)."""

from __future__ import annotations

import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.models.layers import Rotary
from tuneserve.models.registry import model_class
from tuneserve.weights import open_checkpoint
from tuneserve.weights.safetensors import HFCheckpoint


def build_model(arch: ArchConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An uninitialised model (parameters allocated, not filled) on device."""
    with torch.device("meta"):
        model = model_class(arch)(arch)
    model = model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Rotary):
            m.init_tables()
    return model.to(dtype) if dtype != torch.float32 else model


def load_weights(model: nn.Module, path: str, arch: ArchConfig, progress: bool) -> None:
    """Fill a built model from the (unquantized or dequantized-on-read) checkpoint at path."""
    ckpt = open_checkpoint(path)
    if arch.architecture == "gemma3" and isinstance(ckpt, HFCheckpoint):
        model.load_weights(ckpt.tensors(progress=progress), norms_include_one=False)
    else:
        model.load_weights(ckpt.tensors(progress=progress))
