"""Matmuls and row lookups on packed low-bit weights: the compiled CPU kernels and the portable path.

Formats (see csrc/qmatmul.c): q4 packs two 4-bit weights per byte in 32-input blocks (byte j: input j in
the low nibble, input j + 16 in the high one), w = q * scale + min per group of inputs; q5 is q4 plus `qhigh`,
(N, K / 32) int32 words whose bit j adds 16 to input j's code of that block (GGUF Q5_0 / Q5_1's high bits), so
codes run 0..31; q8 stores int8, w = q * scale. Scales (and mins) are (N, K / group) in fp16 or fp32. Every
function taking q4 takes `qhigh` too (None: q4).

`matmul` picks the path within a KernelConfig (kernels/config.py: decided once at load, passed in; the
functions here read no environment). With compiled kernels and the int8 activation mode, below VNNI_MAX_M rows
of x (every row count in int8-all): csrc/qmatmul_vnni.c, which quantizes x to int8 per 32 inputs and takes
integer dot products with the packed weights (llama.cpp's scheme; AVX-512 VNNI or AVX2). Otherwise below
large_m rows (16; 64 on AVX2-only CPUs): csrc/qmatmul.c, which dequantizes inside fp32 dot products. Larger
batches: tiles of the weight are dequantized into a small buffer and multiplied by torch's GEMM; in the int8 /
bf16 modes on CPUs with native bf16 (AVX512-BF16 / AMX) the tiles and x are bf16 (a bf16 GEMM is ~3x an fp32
one here; x and the output are rounded to bf16), elsewhere fp32. The portable path (pure PyTorch, any device)
dequantizes tiles too, optionally rounding x the way the VNNI kernels do (`act_int8`); it is the test oracle
for the kernels, and what a config with quant="portable" runs.
"""

from __future__ import annotations

import ctypes

import torch

from tuneserve.kernels import libraries
from tuneserve.kernels.config import CpuFeatures, KernelConfig, detected

LARGE_M = 16  # from this many rows of x on, dequantize tiles and use a GEMM (AVX-512 and other CPUs) ...
LARGE_M_AVX2 = 64  # ... and on AVX2-only CPUs, where the kernel beats the tiles up to 64 rows (large_m)
# Below this many rows, the int8-activation kernels where the int8 mode runs. SmolLM2's 30 layers of q4 matmuls,
# 2 threads, Xeon with AMX (interleaved, best of 6): the int8 kernel took 0.41x the bf16 tiles' time at 16
# rows, 0.77x at 32, 1.0x at 48, 1.2x at 64. AVX-512's row-lane kernels (csrc/row_lanes.h) beat the tiles
# further: q4 0.53x at 64 rows, 0.83x at 96; q8 0.54x at 64, 1.0x at 96. 96 here made SmolLM2's decode at 64
# sequences 1.8x, but prompt chunks of 48-95 tokens then round x to int8 instead of bf16, and the MoE GGUF's
# HF check moved past its tolerance (0.37 nats against 0.35). So 48 holds for every step a layer runs on its
# own, and the fused decode step (decodes and verification rows only, no prompt chunk) takes the int8 kernels
# up to VNNI_DECODE_MAX_M rows where the row-lane kernels run (AVX-512 VNNI).
VNNI_MAX_M = 48
VNNI_DECODE_MAX_M = 96
# Weights per dequantized tile: 32 MiB of bf16 (64 of fp32), so that most matrices are one GEMM. From 1M: Qwen2.5-
# Coder's pp512 1.21x (its gate|up, 8.7M weights, had been 9 GEMMs), SmolLM2's 1.04x; Xeon with AMX, 2 threads.
TILE_ELEMS = 1 << 24


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """qweight: (N, K/2) uint8 -> (N, K) uint8 in [0, 15], undoing the 32-input block layout."""
    n, half = qweight.shape
    b = qweight.view(n, half // 16, 16)
    return torch.cat((b & 15, b >> 4), dim=-1).view(n, half * 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q: (N, K) integers in [0, 15], K a multiple of 32 -> (N, K/2) uint8 in the 32-input block layout."""
    n, k = q.shape
    if k % 32:
        raise ValueError(f"4-bit packing needs the input size to be a multiple of 32, got {k}")
    b = q.to(torch.uint8).view(n, k // 32, 32)
    return (b[..., :16] | (b[..., 16:] << 4)).view(n, k // 2)


def high_bits(qhigh: torch.Tensor) -> torch.Tensor:
    """qhigh (N, K/32) int32 words -> (N, K) uint8: 16 where an input's bit is set, else 0."""
    bits = (qhigh.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=qhigh.device)) & 1
    return (bits.to(torch.uint8) << 4).reshape(qhigh.shape[0], -1)


def dequant_portable(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                     rows: torch.Tensor | slice | None = None, qhigh: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a packed matrix as fp32 (R, K); mins None means int8 (symmetric). Pure PyTorch."""
    if rows is not None:
        qweight, scales = qweight[rows], scales[rows]
        mins = mins[rows] if mins is not None else None
        qhigh = qhigh[rows] if qhigh is not None else None
    q = unpack_int4(qweight) if mins is not None else qweight
    if qhigh is not None:
        q = q | high_bits(qhigh)
    n, k = q.shape
    ng = scales.shape[1]
    w = q.float().view(n, ng, k // ng) * scales.float().unsqueeze(-1)
    if mins is not None:
        w = w + mins.float().unsqueeze(-1)
    return w.view(n, k)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 GEMMs are fast."""
    return CpuFeatures.detect().native_bf16


def int8_kernels_available() -> bool:
    """Whether the int8-activation (AVX-512 VNNI) kernels are built and run on this CPU."""
    return libraries.qmatmul_vnni() is not None


def uses_act_int8(m: int, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                  kernels: KernelConfig | None = None) -> bool:
    """Whether matmul(path='auto', kernels=kernels) of m rows quantizes the activations to int8 (the VNNI
    kernels). kernels None: `config.detected()`, as for every function here."""
    cfg = kernels or detected()
    if not cfg.quant_act.startswith("int8") or (m >= VNNI_MAX_M and cfg.quant_act != "int8-all") \
            or not _kernel_ok(qweight, scales, mins, cfg) \
            or libraries.qmatmul_vnni() is None:  # None: a hand-made config
        return False
    k = qweight.shape[1] * (2 if mins is not None else 1)
    g = k // scales.shape[1]
    if mins is not None:
        return k % 64 == 0 and (g in (32, 64) or g % 128 == 0)
    return k % 32 == 0 and (g in (16, 32) or g % 64 == 0)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x: (M, K) -> x rounded as the VNNI kernels round it: int8 per 32 inputs, scale max|x| / 127."""
    m, k = x.shape
    xb = x.float().view(m, k // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    c = torch.full_like(amax, 127.0)  # tensor / tensor divides; a scalar numerator takes a reciprocal first,
    inv = torch.where(amax > 0, c / amax, torch.zeros_like(amax))  # which moves exact ties of x * inv
    return ((xb * inv).round() * (amax / c)).view(m, k)


def compiled_available() -> bool:
    """Whether the compiled kernels are built here (whether a model uses them is its KernelConfig's say)."""
    return libraries.qmatmul() is not None


def _kernel_ok(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, cfg: KernelConfig,
               qhigh: torch.Tensor | None = None) -> bool:
    """Whether cfg runs compiled quantized kernels and they take this matrix's device and layout."""
    if cfg.quant != "compiled" or qweight.device.type != "cpu":
        return False
    if qhigh is not None and not (mins is not None and qhigh.dtype == torch.int32 and qhigh.is_contiguous()):
        return False
    k = qweight.shape[1] * (2 if mins is not None else 1)
    group = k // scales.shape[1]
    tensors = [qweight, scales] + ([mins] if mins is not None else [])
    return (group % (32 if mins is not None else 16) == 0 and scales.dtype in (torch.float16, torch.float32)
            and (mins is None or mins.dtype == scales.dtype) and all(t.is_contiguous() for t in tensors))


def large_m(cfg: KernelConfig) -> int:
    """From how many rows of x on a quantized matmul dequantizes tiles for a GEMM instead of running the
    small-batch kernel (which dequantizes each block once per 8 rows). Measured per layer on SmolLM2's
    shapes, 2 threads: on a Zen 3 (AVX2) the kernel takes 0.61x the tiles' time at 16 rows, 0.80x at 32,
    0.85x at 64 and 1.13x at 96; the earlier AVX-512 measurements put the crossover at 16."""
    f = cfg.features
    return LARGE_M_AVX2 if f.avx2 and not f.avx512 else LARGE_M


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _weight_args(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 qhigh: torch.Tensor | None = None) -> tuple:
    """A packed matrix as every compiled kernel takes it, in order: qweight, then for q4 / q5 the high-bit words
    (NULL for q4), scales, mins (q4 / q5 only), f16."""
    if mins is None:
        return qweight.data_ptr(), scales.data_ptr(), int(scales.dtype == torch.float16)
    return qweight.data_ptr(), _ptr(qhigh), scales.data_ptr(), mins.data_ptr(), int(scales.dtype == torch.float16)


def dequant_rows(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 rows: torch.Tensor | None = None, row0: int = 0, nrows: int | None = None,
                 path: str = "auto", dtype: torch.dtype = torch.float32,
                 kernels: KernelConfig | None = None, qhigh: torch.Tensor | None = None) -> torch.Tensor:
    """(R, K) rows of a packed matrix in dtype (fp32 or bf16): rows (R,) long, or row0:row0+nrows."""
    if path != "portable" and _kernel_ok(qweight, scales, mins, kernels or detected(), qhigh):
        k = qweight.shape[1] * (2 if mins is not None else 1)
        if rows is not None:
            rows = rows.to(torch.int64).contiguous()
        r = rows.numel() if rows is not None else (nrows if nrows is not None else qweight.shape[0] - row0)
        out = torch.empty(r, k, dtype=dtype)
        name = ("q4" if mins is not None else "q8") + ("_dequant_bf16" if dtype == torch.bfloat16 else "_dequant")
        getattr(libraries.qmatmul(), name)(*_weight_args(qweight, scales, mins, qhigh), k, k // scales.shape[1],
                                           _ptr(rows), r, row0, out.data_ptr())
        return out
    sel = rows if rows is not None else slice(row0, row0 + nrows if nrows is not None else None)
    return dequant_portable(qweight, scales, mins, sel, qhigh).to(dtype)


def matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
           bias: torch.Tensor | None = None, path: str = "auto", act_int8: bool = False,
           act_bf16: bool = False, int8_ok: bool = True, kernels: KernelConfig | None = None,
           out_dtype: torch.dtype = torch.float32, qhigh: torch.Tensor | None = None) -> torch.Tensor:
    """x: (M, K) fp32 or bf16 -> (M, N) in out_dtype (fp32 or bf16) = x @ W^T + bias, W given packed. path:
    auto (kernels' choice) | portable. Where bf16 tiles run, bf16 x and a bf16 result skip the conversions
    (x is rounded to bf16 there anyway; torch's GEMM gives bf16, the AMX GEMM fp32 sums rounded once for a bf16
    result). For the portable path, act_int8 / act_bf16 round x as the VNNI kernels / the bf16 tiles do (test
    oracles)."""
    m = x.shape[0]
    cfg = kernels or detected()
    if path != "portable" and x.device.type == "cpu" and _kernel_ok(qweight, scales, mins, cfg, qhigh):
        if int8_ok and uses_act_int8(m, qweight, scales, mins, cfg):
            y = _kernel_matmul(libraries.qmatmul_vnni(), "q4v_matmul", "q8v_matmul", x.float(), qweight, scales,
                               mins, bias, qhigh)
        elif m < large_m(cfg):
            y = _kernel_matmul(libraries.qmatmul(), "q4_matmul", "q8_matmul", x.float(), qweight, scales, mins, bias,
                               qhigh)
        else:
            dtype = torch.bfloat16 if cfg.bf16_tiles else torch.float32
            return _tiled_matmul(x, qweight, scales, mins, bias, "auto", dtype, cfg, out_dtype, qhigh)
        return y.to(out_dtype)
    if act_int8:
        x = quantize_activations(x)
    dtype = torch.bfloat16 if act_bf16 and not act_int8 else torch.float32
    return _tiled_matmul(x.float(), qweight, scales, mins, bias, "portable", dtype, out_dtype=out_dtype, qhigh=qhigh)


def small_batch_call(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                     bias: torch.Tensor | None, int8_ok: bool = True, perm: torch.Tensor | None = None,
                     input_scale: torch.Tensor | None = None, kernels: KernelConfig | None = None,
                     qhigh: torch.Tensor | None = None) -> tuple | None:
    """(kernel, args after (x, M, K), max rows, max rows in the fused decode step) for calling the compiled
    kernel directly on small batches, skipping the dispatch above; the kernel applies perm / input_scale
    (x'[k] = x[perm[k]] * input_scale[perm[k]]) itself. None when kernels runs no compiled kernel for this
    matrix. The args hold raw pointers: rebuild after the tensors move."""
    cfg = kernels or detected()
    if not _kernel_ok(qweight, scales, mins, cfg, qhigh):
        return None
    k = qweight.shape[1] * (2 if mins is not None else 1)
    n, group = qweight.shape[0], k // scales.shape[1]
    vnni = int8_ok and uses_act_int8(1, qweight, scales, mins, cfg)
    lib = libraries.qmatmul_vnni() if vnni else libraries.qmatmul()
    name = ("q4" if mins is not None else "q8") + ("v" if vnni else "") + "_matmul"
    args = _weight_args(qweight, scales, mins, qhigh) + (n, group, _ptr(bias))
    if perm is not None or input_scale is not None:
        name += "_px"
        args += (_ptr(perm), _ptr(input_scale))
    fn = getattr(lib, name)
    if name.endswith("_px"):
        fn.argtypes = list(getattr(lib, name[:-3]).argtypes[:-1]) + [ctypes.c_void_p] * 3
        fn.restype = None
    if not vnni:
        return fn, args, large_m(cfg), large_m(cfg)
    return fn, args, VNNI_MAX_M, VNNI_DECODE_MAX_M if cfg.features.avx512_vnni else VNNI_MAX_M


def uses_act_bf16(m: int, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                  kernels: KernelConfig | None = None) -> bool:
    """Whether matmul(path='auto', kernels=kernels) of m rows multiplies bf16 tiles."""
    cfg = kernels or detected()
    return (cfg.bf16_tiles and m >= large_m(cfg) and _kernel_ok(qweight, scales, mins, cfg)
            and not uses_act_int8(m, qweight, scales, mins, cfg))


def bf16_tile_rows(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, int8_ok: bool = True,
                   kernels: KernelConfig | None = None, qhigh: torch.Tensor | None = None) -> int | None:
    """The fewest rows of x from which matmul(path='auto', int8_ok=int8_ok, kernels=kernels) multiplies bf16
    tiles (it does at every larger count); None: at no row count."""
    cfg = kernels or detected()
    if not (cfg.bf16_tiles and _kernel_ok(qweight, scales, mins, cfg, qhigh)):
        return None
    if not (int8_ok and uses_act_int8(1, qweight, scales, mins, cfg)):
        return large_m(cfg)
    if uses_act_int8(1 << 30, qweight, scales, mins, cfg):
        return None  # int8 at every row count (int8-all)
    return max(large_m(cfg), VNNI_MAX_M)


def _kernel_matmul(lib: ctypes.CDLL, q4: str, q8: str, x: torch.Tensor, qweight: torch.Tensor,
                   scales: torch.Tensor, mins: torch.Tensor | None,
                   bias: torch.Tensor | None, qhigh: torch.Tensor | None = None) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    getattr(lib, q4 if mins is not None else q8)(x.data_ptr(), m, k, *_weight_args(qweight, scales, mins, qhigh), n,
                                                 k // scales.shape[1], _ptr(bias), y.data_ptr())
    return y


def _tiled_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                  bias: torch.Tensor | None, path: str, dtype: torch.dtype = torch.float32,
                  cfg: KernelConfig | None = None, out_dtype: torch.dtype = torch.float32,
                  qhigh: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T by dequantizing row tiles of W (a bounded buffer, fp32 or bf16) and calling the GEMM."""
    n = qweight.shape[0]
    k = x.shape[1]
    if path != "portable" and dtype == torch.bfloat16 and cfg is not None and cfg.tile_gemm == "amx" \
            and n % 16 == 0 and k % 32 == 0:
        return _amx_matmul(x, qweight, scales, mins, bias, out_dtype, qhigh)
    tile = max(1, TILE_ELEMS // k)
    xt = x.to(dtype)
    if tile >= n:
        y = (xt @ dequant_rows(qweight, scales, mins, path=path, dtype=dtype, kernels=cfg, qhigh=qhigh).t()
             ).to(out_dtype)
    else:
        y = torch.empty(x.shape[0], n, dtype=out_dtype, device=x.device)
        for r0 in range(0, n, tile):
            r1 = min(n, r0 + tile)
            w = dequant_rows(qweight, scales, mins, row0=r0, nrows=r1 - r0, path=path, dtype=dtype, kernels=cfg,
                             qhigh=qhigh)
            y[:, r0:r1] = xt @ w.t()
    if bias is not None:
        y += bias
    return y


def _amx_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                bias: torch.Tensor | None, out_dtype: torch.dtype, qhigh: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) on AMX tiles (csrc/amx_matmul.c): the bf16 tiles' products without the tiles."""
    xb = x.to(torch.bfloat16).contiguous()
    m, k = xb.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=out_dtype)
    b = None if bias is None else bias.float().contiguous()
    fn = libraries.amx_matmul().q4_amx_matmul if mins is not None else libraries.amx_matmul().q8_amx_matmul
    fn(xb.data_ptr(), m, k, *_weight_args(qweight, scales, mins, qhigh), n, k // scales.shape[1], _ptr(b),
       int(out_dtype == torch.bfloat16), y.data_ptr())
    return y
