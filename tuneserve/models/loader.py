"""Build a model for a resolved checkpoint and load its weights."""

from __future__ import annotations

import os

import torch
from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.models.layers import Rotary
from tuneserve.models.registry import model_class
from tuneserve.weights import open_checkpoint
from tuneserve.weights.safetensors import HFCheckpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model(arch: ArchConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An uninitialised model (parameters allocated, not filled) on device."""
    with torch.device("meta"):
        model = model_class(arch)(arch)
    model = model.to_empty(device=device)
    for m in model.modules():
        if isinstance(m, Rotary):
            m.init_tables()
    return model.to(dtype) if dtype != torch.float32 else model


def load_model(path: str, arch: ArchConfig, device: torch.device, dtype: str = "float32",
               progress: bool | None = None, quantization: str | None = None) -> nn.Module:
    """Build the model for arch and fill it from the checkpoint at path (dequantized to fp32 first), then
    quantize it if asked (tuneserve/quant). A quantized checkpoint directory, given as path or as
    quantization, fills the model directly with its packed weights."""
    from tuneserve.quant.checkpoint import quant_kind

    if progress is None:  # progress bars unless the user asked for quiet
        progress = os.environ.get("TUNESERVE_QUIET") != "1"
    model = build_model(arch, device)
    qdir = quantization if quantization and quant_kind(quantization) else (path if quant_kind(path) else None)
    if qdir is None:
        ckpt = open_checkpoint(path)
        if arch.architecture == "gemma3" and isinstance(ckpt, HFCheckpoint):
            model.load_weights(ckpt.tensors(progress=progress), norms_include_one=False)
        else:
            model.load_weights(ckpt.tensors(progress=progress))
    if dtype != "float32":
        model = model.to(DTYPES[dtype])
        for m in model.modules():
            if isinstance(m, Rotary):  # rope tables stay fp32: positions up to 32k need the precision
                m.cos, m.sin = m.cos.float(), m.sin.float()
    if qdir is not None or quantization is not None:
        from tuneserve.quant import quantize_model

        quantize_model(model, str(qdir or quantization), checkpoint_path=path, progress=progress)
    return model.eval()
