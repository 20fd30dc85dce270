"""fp32 linear layers for few rows: the compiled small-batch kernel (csrc/dense_matmul.c) or torch.

From 4 rows of x on the CPU (decode batches, speculative verification), PyTorch's GEMM runs much slower
per row than at one row although the work is bound by reading the weights (SmolLM2's linears: 19 ms at
M = 1, 46 ms at M = 8); the compiled kernel streams the weights once for all rows of x (31 ms at M = 8,
the same as torch at M = 1). Larger batches, other dtypes and other devices use F.linear. Whether a
model's layers use the kernel at all is decided once at load (KernelConfig.dense, kernels/config.py) and
bound to each DenseLinear; with dense="torch" (kernels="portable") F.linear runs everywhere, the oracle the
kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneserve.kernels import libraries
from tuneserve.kernels.config import KernelConfig
from tuneserve.kernels.decode_step import LIN_F32, LinearT, address, ptr

SMALL_M = 24  # from about this many rows on, torch's GEMM is as fast (measured: 1.15x at 16-20 rows, 1.0x at 28-32)


def available() -> bool:
    """Whether the compiled kernel is built here."""
    return libraries.dense() is not None


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes these operands: few fp32 rows on the CPU, a contiguous fp32 weight."""
    return (x.dim() == 2 and x.shape[0] < SMALL_M and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.is_contiguous())


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether linear(x, weight) takes the compiled small-batch kernel (it is built and takes them)."""
    return available() and _takes(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           compiled: bool | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T + bias, as F.linear. compiled: whether the kernel may run (a bound
    KernelConfig's choice; True promises it is built); None: wherever it is built."""
    if not ((available() if compiled is None else compiled) and _takes(x, weight)):
        return F.linear(x, weight, bias)
    x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    b = None if bias is None else bias.contiguous()
    lib = libraries.dense()
    lib.f32_matmul(x.data_ptr(), m, k, weight.data_ptr(), n, None if b is None else b.data_ptr(), y.data_ptr())
    return y


class DenseLinear(nn.Linear):
    """nn.Linear whose forward takes the small-batch kernel where it applies (same parameters and names,
    so checkpoints load and quantization swaps it like any nn.Linear)."""

    compiled: bool | None = None  # bound at load from KernelConfig.dense; None (never bound): where built

    def bind_kernels(self, config: KernelConfig) -> None:
        """Take config's dense choice (see kernels/config.py)."""
        self.compiled = config.dense == "compiled"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.compiled)

    def fused_linear(self) -> tuple[LinearT, int] | None:
        """This layer as the fused decode step calls it (kernels/decode_step.py) and the rows it takes there;
        None where its forward would not take the compiled kernel."""
        w, b = self.weight, self.bias
        if not (self.compiled and w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
                and (b is None or b.is_contiguous())):
            return None
        desc = LinearT(kind=LIN_F32, fn=address(libraries.dense().f32_matmul), w=w.data_ptr(), n=w.shape[0],
                       k=w.shape[1], bias=ptr(b))
        return desc, SMALL_M
