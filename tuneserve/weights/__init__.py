"""Checkpoint readers: GGUF files and HF model directories."""

from __future__ import annotations

from pathlib import Path

from tuneserve.weights.gguf import GGUFCheckpoint
from tuneserve.weights.safetensors import HFCheckpoint


def open_checkpoint(path: str | Path) -> GGUFCheckpoint | HFCheckpoint:
    """The reader for a local GGUF file or HF model directory."""
    p = Path(path)
    if p.is_dir():
        return HFCheckpoint(p)
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFCheckpoint(p)
    raise ValueError(f"{p}: not a GGUF file or a model directory")
