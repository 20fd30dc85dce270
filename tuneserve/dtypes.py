"""The one table from dtype names (EngineArgs.dtype) to torch dtypes, and their sizes."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name ("float32", "bfloat16", "float16")."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def element_bytes(name: str) -> int:
    """Bytes per element of a dtype name."""
    return torch.finfo(torch_dtype(name)).bits // 8
