"""Greedy picks: the row-wise argmax of a step's logits (csrc/argmax.c on CPU, torch.argmax elsewhere)."""

from __future__ import annotations

import torch

from tuneserve.kernels import libraries


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: (R, V) -> (R,) int64, torch.argmax(x, -1)'s answer (first index of the largest; NaN counts as largest).
    The compiled kernel takes fp32 CPU rows with unit stride; anything else goes to torch."""
    lib = libraries.argmax()
    if lib is None or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 \
            or x.shape[1] == 0:
        return x.argmax(-1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    lib.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), out.data_ptr())
    return out
