"""The compiled CPU libraries and their C signatures, each built and loaded once (kernels/cpu_build.py).

A function returns None where its library cannot be built or does not run on this CPU; the kernel
configuration (kernels/config.py) asks these to know what is available, the op modules to call them.
"""

from __future__ import annotations

import ctypes
import functools

from tuneserve.kernels.cpu_build import load, load_functions

_P, _I = ctypes.c_void_p, ctypes.c_int64


@functools.cache
def dense() -> ctypes.CDLL | None:
    """csrc/dense_matmul.c: fp32 small-batch linear."""
    return load_functions("dense_matmul", {"f32_matmul": [_P, _I, _I, _P, _I, _P, _P]})


@functools.cache
def qmatmul() -> ctypes.CDLL | None:
    """csrc/qmatmul.c: int4 / int5 / int8 weight matmuls with fp32 activations, and dequantization."""
    q4_deq, q8_deq = [_P, _P, _P, _P, _I, _I, _I, _P, _I, _I, _P], [_P, _P, _I, _I, _I, _P, _I, _I, _P]
    return load_functions("qmatmul", {
        "q4_matmul": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _P, _P],
        "q8_matmul": [_P, _I, _I, _P, _P, _I, _I, _I, _P, _P],
        "q4_dequant": q4_deq, "q4_dequant_bf16": q4_deq, "q8_dequant": q8_deq, "q8_dequant_bf16": q8_deq})


@functools.cache
def qmatmul_vnni() -> ctypes.CDLL | None:
    """csrc/qmatmul_vnni.c: int8-activation matmuls (AVX-512 VNNI); None where the CPU lacks VNNI."""
    lib = load_functions("qmatmul_vnni", {"q4v_matmul": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _P, _P],
                                          "q8v_matmul": [_P, _I, _I, _P, _P, _I, _I, _I, _P, _P]})
    return lib if lib is not None and lib.qv_available() else None


@functools.cache
def amx_matmul() -> ctypes.CDLL | None:
    """csrc/amx_matmul.c: q4 / q5 / q8 matmuls of bf16 x on AMX tiles; None where the CPU or kernel has no AMX."""
    sig = {"q4_amx_matmul": [_P, _I, _I, _P, _P, _P, _P, _I, _I, _I, _P, _I, _P],
           "q8_amx_matmul": [_P, _I, _I, _P, _P, _I, _I, _I, _P, _I, _P]}
    lib = load_functions("amx_matmul", sig)
    return lib if lib is not None and lib.amx_available() else None


@functools.cache
def gated_act() -> ctypes.CDLL | None:
    """csrc/gated_act.c: act(gate) * up on a gated MLP's bf16 or fp32 rows, in fp32, rounded to bf16 once."""
    return load_functions("gated_act", {"gated_act_bf16": [_P, _I, _I, _I, _P], "gated_act_f32": [_P, _I, _I, _I, _P]})


@functools.cache
def argmax() -> ctypes.CDLL | None:
    """csrc/argmax.c: row-wise argmax of fp32 logits, as torch.argmax answers it."""
    return load_functions("argmax", {"argmax_rows": [_P, _I, _I, _I, _P]})


@functools.cache
def paged_attention() -> ctypes.CDLL | None:
    """csrc/paged_attention.c: short-query attention over the paged cache."""
    lib = load("paged_attention")
    if lib is not None:
        lib.paged_attention_f32.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 8 + [ctypes.c_float]
        lib.paged_attention_f32.restype = None
    return lib


@functools.cache
def decode_step() -> ctypes.CDLL | None:
    """csrc/decode_step.c: every decoder layer of a few short query rows in one call."""
    lib = load("decode_step")
    if lib is not None:
        lib.decode_step.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_void_p]
        lib.decode_step.restype = ctypes.c_int64
    return lib
