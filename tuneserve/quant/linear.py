"""Quantized layers: a Linear and an Embedding that keep only packed weights and compute from them.

One packed matrix (N rows, K inputs) serves both: `QuantLinear` multiplies by it, `QuantEmbedding`
dequantizes only the looked-up rows and, as a tied LM head, multiplies by the same packed tensor.
Buffers (all persistent, so `state_dict()` is the checkpoint format):
  qweight  int4: (N, K/2) uint8, 32-input blocks (kernels/quant_ops.py); int8: (N, K) int8
  scales   (N, K/group) fp16 or fp32;  mins (int4 / int5): same shape, w = q * scale + min
  qhigh    int5 only: (N, K/32) int32, bit j of a block's word adds 16 to input j's 4-bit code (GGUF Q5_0 / Q5_1)
  perm     optional (K,) long: inputs were quantized in this order (GPTQ act-order); x is permuted first
  input_scale optional (K,) fp32: x is multiplied by it first (AWQ scales that no earlier op absorbed)
  bias     optional (N,) fp32
The layout is self-describing: bits, group size and K follow from the shapes and dtypes.

Which kernels a layer runs (compiled or portable, int8 / bf16 / fp32 activations) is the KernelConfig bound
to it at load (`bind_kernels`, kernels/config.py); a layer never bound uses `config.detected()`, the
machine's fastest. Forwards read no environment.
"""

from __future__ import annotations

import torch
from torch import nn

from tuneserve.kernels import quant_ops
from tuneserve.kernels.config import KernelConfig, detected
from tuneserve.kernels.decode_step import LIN_Q4, LIN_Q8, LinearT, address


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored packed (int4 / int5 asymmetric groups or int8 symmetric groups)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, perm: torch.Tensor | None = None,
                 input_scale: torch.Tensor | None = None, qhigh: torch.Tensor | None = None) -> None:
        super().__init__()
        if qhigh is not None and mins is None:
            raise ValueError("int5 weights (qhigh) are asymmetric: they need mins")
        self.bits = 8 if mins is None else 5 if qhigh is not None else 4
        self.out_features = qweight.shape[0]
        self.in_features = qweight.shape[1] * (1 if self.bits == 8 else 2)
        self.group_size = self.in_features // scales.shape[1]
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous() if mins is not None else None)
        self.register_buffer("qhigh", qhigh.to(torch.int32).contiguous() if qhigh is not None else None)
        self.register_buffer("bias", bias.float().contiguous() if bias is not None else None)
        self.register_buffer("perm", perm.long().contiguous() if perm is not None else None)
        self.register_buffer("input_scale",
                             input_scale.float().contiguous() if input_scale is not None else None)
        self.path = "auto"  # "portable" forces the PyTorch path (tests)
        self.out_dtype = torch.float32  # embedding lookups return the model's dtype
        self.int8_activations = True  # may small batches take the int8-activation (VNNI) kernels
        self.kernels: KernelConfig | None = None  # bound at load (bind_kernels); None: config.detected()
        self._call: tuple | None = None  # cached direct kernel call for small batches (see _small_call)
        self._call_key: tuple = ()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={self.group_size}, "
                f"scales={str(self.scales.dtype).removeprefix('torch.')}, act_order={self.perm is not None}, "
                f"input_scale={self.input_scale is not None}")

    def bind_kernels(self, config: KernelConfig) -> None:
        """Run on config's kernels from now on (see kernels/config.py)."""
        self.kernels = config
        self._call_key = ()

    def _config(self) -> KernelConfig:
        return self.kernels or detected()

    def _small_call(self) -> tuple | None:
        """The compiled kernel and its fixed arguments for small batches (a decode step calls ~100 layers:
        the generic dispatch would cost more than the kernel). Rebuilt when the weights move, or `path`
        or the bound KernelConfig changes."""
        key = (self.path, self.qweight.data_ptr(), self.kernels)
        if key != self._call_key:
            self._call_key = key
            self._call = None
            if self.path == "auto" and self.qweight.device.type == "cpu":
                self._call = quant_ops.small_batch_call(self.qweight, self.scales, self.mins, self.bias,
                                                        self.int8_activations, self.perm, self.input_scale,
                                                        self._config(), self.qhigh)
        return self._call

    def _linear(self, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x: (..., K) any float dtype -> (M, N) in out_dtype, M = the product of x's leading dims. bf16 x
        and out_dtype reach the bf16 tiles unconverted (quant_ops.matmul); other paths compute in fp32."""
        if x.dim() != 2:
            x = x.reshape(-1, self.in_features)
        call = self._small_call()
        if call is not None and x.shape[0] < call[2]:  # the kernel applies perm / input_scale itself
            x = x.float().contiguous()
            y = torch.empty(x.shape[0], self.out_features)
            call[0](x.data_ptr(), x.shape[0], self.in_features, *call[1], y.data_ptr())
            return y.to(out_dtype)
        if x.dtype != torch.bfloat16 or self.input_scale is not None or self.perm is not None:
            x = x.float()
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        return quant_ops.matmul(x, self.qweight, self.scales, self.mins, self.bias, self.path,
                                int8_ok=self.int8_activations, kernels=self._config(), out_dtype=out_dtype,
                                qhigh=self.qhigh)

    def tile_sums(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M, K) bf16, at a row count where this layer multiplies bf16 tiles -> (M, N) x @ W^T as exact as
        the tiles' GEMM gives it: fp32 from the AMX GEMM (unrounded sums), bf16 from torch's (its output)."""
        exact = torch.float32 if self._config().tile_gemm == "amx" else torch.bfloat16
        return self._linear(x, exact)

    def bf16_tile_rows(self) -> int | None:
        """From how many rows of x on this layer multiplies bf16 tiles (None: never): where x is rounded to bf16
        (and the output too, on torch's GEMM), so attention on it may round to bf16 as well (models/layers.py)."""
        if self.path != "auto" or self.qweight.device.type != "cpu":
            return None
        return quant_ops.bf16_tile_rows(self.qweight, self.scales, self.mins, self.int8_activations, self._config(),
                                        self.qhigh)

    def fused_linear(self) -> tuple[LinearT, int] | None:
        """This layer as the fused decode step calls it (kernels/decode_step.py): the small-batch kernel and
        its arguments, and the rows it takes; None where there is none, or inputs are permuted or scaled."""
        call = self._small_call()
        if call is None or self.perm is not None or self.input_scale is not None:
            return None
        fn, args, _, max_rows = call  # the fused step runs decode rows only: its own limit
        w, qh, scales, mins = (args[0], None, args[1], None) if self.bits == 8 else args[:4]
        f16, n, group, bias = args[-4:]
        desc = LinearT(kind=LIN_Q8 if self.bits == 8 else LIN_Q4, fn=address(fn), w=w, qh=qh, scales=scales,
                       mins=mins, f16=f16, n=n, k=self.in_features, group=group, bias=bias)
        return desc, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) -> (..., N), in x's dtype."""
        y = self._linear(x, torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y.to(x.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (R, K) -> fp32 logits (R, N), for an untied quantized LM head."""
        return self.forward(hidden.float())

    def dequantize(self) -> torch.Tensor:
        """The effective fp32 weight (N, K) in the original input order (tests and error measurement)."""
        w = quant_ops.dequant_rows(self.qweight, self.scales, self.mins, path=self.path, kernels=self._config(),
                                   qhigh=self.qhigh)
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.input_scale is not None:
            w = w * self.input_scale
        return w

    @property
    def weight_bytes(self) -> int:
        """Bytes of every buffer of this layer."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class QuantEmbedding(QuantLinear):
    """Embedding lookup from a packed (vocab, hidden) matrix; `logits` reuses it as a tied LM head."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """ids: (N,) long -> (N, hidden) fp32, dequantizing only those rows."""
        if self.perm is not None:
            raise ValueError("an embedding cannot use act-order (permuted input columns)")
        rows = quant_ops.dequant_rows(self.qweight, self.scales, self.mins, rows=ids.reshape(-1),
                                      path=self.path, kernels=self._config(), qhigh=self.qhigh)
        if self.input_scale is not None:
            rows = rows * self.input_scale
        return rows.view(*ids.shape, self.in_features).to(self.out_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (R, hidden) -> fp32 logits (R, vocab) from the packed embedding (tied head)."""
        return self._linear(hidden)


class ConcatLinear(nn.Module):
    """Several (quantized or plain) linears on the same input, outputs concatenated along the last dim.

    Used where a fused projection (q|k|v, gate|up) comes from parts stored in different formats.
    """

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.out_features = sum(_out_features(p) for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., K) -> (..., sum of the parts' N)."""
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def tile_sums(self, x: torch.Tensor) -> torch.Tensor:
        """QuantLinear.tile_sums of every part, concatenated (where bf16_tile_rows is not None, all parts are
        quantized layers under one config)."""
        return torch.cat([p.tile_sums(x) for p in self.parts], dim=-1)

    def bf16_tile_rows(self) -> int | None:
        """From how many rows of x on every part multiplies bf16 tiles (None: some part never does)."""
        rows = [getattr(p, "bf16_tile_rows", lambda: None)() for p in self.parts]
        return None if None in rows else max(rows)

    def dequantize(self) -> torch.Tensor:
        """The effective fp32 weight (N, K)."""
        return torch.cat([p.dequantize() if hasattr(p, "dequantize") else p.weight.float()
                          for p in self.parts])


def _out_features(m: nn.Module) -> int:
    return int(m.out_features)


def set_path(model: nn.Module, path: str) -> None:
    """Force every quantized layer of model onto a kernel path: 'portable', or 'auto' (its bound
    KernelConfig's choice)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.path = path
            m._call_key = ()


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of model (packed weights, scales, mins, norms, biases);
    persistent buffers only, so rope tables and other caches do not count."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for mod in model.modules():
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and name not in mod._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total
