"""The fused decode step (csrc/decode_step.c): every decoder layer of a few short query rows in one call.

This module holds the C structures and the call; models/fused_decode.py fills them from a model. A
linear layer describes itself (`fused_linear()` on DenseLinear and QuantLinear) as the compiled kernel it
would call op by op and that kernel's fixed arguments, so both paths run the same matmul code.
"""

from __future__ import annotations

import ctypes

import torch

from tuneserve.kernels import libraries

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
LIN_F32, LIN_Q4, LIN_Q8 = 1, 2, 3
ACTS = {"silu": 0, "gelu_tanh": 1}


class LinearT(ctypes.Structure):
    _fields_ = [("kind", _I), ("fn", _P), ("w", _P), ("qh", _P), ("scales", _P), ("mins", _P), ("f16", _I), ("n", _I),
                ("k", _I), ("group", _I), ("bias", _P)]


class LayerT(ctypes.Structure):
    _fields_ = [("in_norm", _P), ("post_norm", _P), ("attn_out_norm", _P), ("mlp_out_norm", _P),
                ("q_norm", _P), ("k_norm", _P), ("qkv", LinearT), ("o", LinearT), ("gate_up", LinearT),
                ("down", LinearT), ("cos", _P), ("sin", _P), ("rot", _I), ("k_cache", _P), ("v_cache", _P),
                ("group", _I), ("scale", _F)]


class GroupT(ctypes.Structure):
    _fields_ = [("slots", _P), ("rows", _P), ("qpos", _P), ("row_seq", _P), ("block_table", _P),
                ("max_blocks", _I), ("num_rows", _I), ("window", _I), ("sinks", _I)]


class ModelT(ctypes.Structure):
    _fields_ = [("num_layers", _I), ("hidden", _I), ("heads", _I), ("kv_heads", _I), ("head_dim", _I),
                ("inter", _I), ("block_size", _I), ("act", _I), ("eps", _F), ("layers", ctypes.POINTER(LayerT)),
                ("attention", _P), ("final_norm", _P)]


def available() -> bool:
    """Whether the fused step and the attention kernel it calls are built here."""
    return libraries.decode_step() is not None and libraries.paged_attention() is not None


def address(fn: ctypes._CFuncPtr) -> int:  # noqa: SLF001 - ctypes names its function type privately
    """The machine address of a loaded C function, for a structure's function-pointer field."""
    return ctypes.cast(fn, ctypes.c_void_p).value


def attention_address() -> int:
    return address(libraries.paged_attention().paged_attention_f32)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(model: ModelT, groups: ctypes.Array, positions: torch.Tensor, x: torch.Tensor) -> None:
    """Run every layer over x (rows, hidden) fp32 contiguous, in place; positions (rows,) long."""
    rc = libraries.decode_step().decode_step(ctypes.addressof(model), ctypes.addressof(groups),
                                             positions.data_ptr(), x.shape[0], x.data_ptr())
    if rc:
        raise MemoryError("the fused decode step could not allocate its scratch buffers")
