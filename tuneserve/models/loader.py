"""Build a model for a resolved checkpoint and fill it with the checkpoint's weights (unquantized)."""

from __future__ import annotations

import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.models.layers import Rotary
from tuneserve.models.registry import model_class
from tuneserve.weights import open_checkpoint


def build_model(arch: ArchConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An uninitialised model (parameters allocated, not filled) on device."""
    with torch.device("meta"):
        model = model_class(arch)(arch)
    model = model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Rotary):
            m.init_tables()
    return model.to(dtype) if dtype != torch.float32 else model


def load_weights(model: nn.Module, path: str, arch: ArchConfig, progress: bool,
                 native: tuple[set[str], set[str]] | None = None) -> None:
    """Fill a built model from the (unquantized or dequantized-on-read) checkpoint at path. `native`: the
    checkpoint's weights and our modules' weights that are served from the file's own blocks instead
    (quant/gguf_native.py): not read here, and their parameters left unwritten (never resident)."""
    if native is None:
        model.load_weights(open_checkpoint(path).tensors(progress=progress))
        return
    sources, targets = native
    model.load_weights(open_checkpoint(path).tensors(progress=progress, skip=frozenset(sources)),
                       elsewhere=frozenset(targets))
