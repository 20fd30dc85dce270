"""fp32 linear layers for few rows: the compiled small-batch kernel (csrc/dense_matmul.c) or torch.

From 4 rows of x on the CPU (decode batches, speculative verification), PyTorch's GEMM runs much slower
per row than at one row although the work is bound by reading the weights (SmolLM2's linears: 19 ms at
M = 1, 46 ms at M = 8); the compiled kernel streams the weights once for all rows of x (31 ms at M = 8,
the same as torch at M = 1). Larger batches, other dtypes and other devices use F.linear.
`TUNESERVE_KERNELS=portable` forces F.linear everywhere (the oracle the kernel is tested against).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

SMALL_M = 24  # from about this many rows on, torch's GEMM is as fast (measured: 1.15x at 16-20 rows, 1.0x at 28-32)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    from tuneserve.kernels.cpu_build import load_functions

    p, i = ctypes.c_void_p, ctypes.c_int64
    return load_functions("dense_matmul", {"f32_matmul": [p, i, i, p, i, p, p]})


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the compiled small-batch kernel."""
    return (x.dim() == 2 and x.shape[0] < SMALL_M and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous()
            and os.environ.get("TUNESERVE_KERNELS", "auto") != "portable" and _lib() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias, as F.linear."""
    if not kernel_applies(x, weight):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.contiguous()
    _lib().f32_matmul(x.data_ptr(), m, k, weight.data_ptr(), n, None if b is None else b.data_ptr(), y.data_ptr())
    return y


class DenseLinear(nn.Linear):
    """nn.Linear whose forward takes the small-batch kernel where it applies (same parameters and names,
    so checkpoints load and quantization swaps it like any nn.Linear)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
