"""bf16 between the MLP's matmuls (models/layers.py GatedMLP.bf16_between): where both of its matmuls multiply
bf16 tiles, x, gate|up's output and act(gate) * up stay bf16 instead of going to fp32 and back; the fused
act(gate) * up on bf16 rows (kernels/activation_ops.py); and the quantized matmul's bf16-in / bf16-out path
(kernels/quant_ops.py)."""

import pytest
import torch
from conftest import packed_weights

from tuneserve.calibration.calibrate import fresh_context
from tuneserve.kernels import activation_ops, libraries, quant_ops
from tuneserve.kernels.config import resolve
from tuneserve.loading import load_model
from tuneserve.models.layers import GatedMLP
from tuneserve.quant.linear import QuantLinear, set_path
from tuneserve.weights import open_checkpoint

ROWS = (1, 15, 16, 47, 48, 512)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile_elems", [1 << 24, 40 * 64])  # one GEMM; tiles of 40 rows (the last one short)
def test_bf16_in_and_out_is_the_fp32_result_rounded_once(vnni_bf16_cpu, monkeypatch, bits, tile_elems):
    """On the bf16 tiles, a bf16 x and a bf16 result only skip conversions: the same values as fp32 in and out,
    rounded to bf16 at the end."""
    monkeypatch.setattr(quant_ops, "TILE_ELEMS", tile_elems)
    cfg = resolve(quant_activations="bf16", env={})
    qw, sc, mn = packed_weights(100, 64, bits)
    x = torch.randn(48, 64).bfloat16()
    got = quant_ops.matmul(x, qw, sc, mn, kernels=cfg, out_dtype=torch.bfloat16)
    want = quant_ops.matmul(x.float(), qw, sc, mn, kernels=cfg)
    assert got.dtype == torch.bfloat16 and want.dtype == torch.float32
    assert torch.equal(got, want.bfloat16())
    assert torch.equal(quant_ops.matmul(x, qw, sc, mn, kernels=cfg), want)  # bf16 in, fp32 out: the same GEMM


def test_a_bf16_input_below_the_tiles_runs_the_fp32_kernel(vnni_bf16_cpu):
    cfg = resolve(quant_activations="bf16", env={})
    layer = QuantLinear(*packed_weights(100, 64, 4))
    layer.bind_kernels(cfg)
    x = torch.randn(4, 64).bfloat16()  # below large_m: the small-batch kernel, fp32 inside
    y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, layer(x.float()).bfloat16())


def _model(tiny_dirs, quantization, env=None, **choices):
    path = str(tiny_dirs["llama"])
    return load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False,
                      quantization=quantization, kernels=resolve(kernels="unfused", **choices, env=env or {}))


def _mlps(model) -> list[GatedMLP]:
    return [m for m in model.modules() if isinstance(m, GatedMLP)]


@pytest.mark.parametrize("quantization,choices,bf16_from", [
    ("int4", {}, 48),  # int8 activations below 48 rows, bf16 tiles from there
    ("int8", {"quant_activations": "bf16"}, 16),  # tiles from large_m
    ("int4", {"quant_activations": "fp32"}, None),  # fp32 tiles
    ("int4", {"quant_activations": "int8-all"}, None),  # no tiles at any row count
    (None, {}, None),  # fp32 weights (the HF-equality path)
])
def test_the_mlp_stays_bf16_exactly_where_both_matmuls_multiply_bf16_tiles(tiny_dirs, vnni_bf16_cpu, quantization,
                                                                           choices, bf16_from):
    mlps = _mlps(_model(tiny_dirs, quantization, **choices))
    assert mlps
    for mlp in mlps:
        assert [r for r in ROWS if mlp.bf16_between(r)] == \
            ([] if bf16_from is None else [r for r in ROWS if r >= bf16_from])


def test_the_portable_path_keeps_the_mlp_fp32(tiny_dirs, vnni_bf16_cpu):
    model = _model(tiny_dirs, "int4")
    set_path(model, "portable")
    assert not any(mlp.bf16_between(512) for mlp in _mlps(model))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_the_fused_activation_is_fp32_math_rounded_once(act):
    """Against torch's fp32 act and product rounded to bf16: at most one bf16 unit apart (the kernel's expf /
    tanhf against torch's; near gelu's zeros, 1 + tanh cancels), and nearly always equal; torch's bf16 ops,
    rounding twice, match far less often."""
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(64, 2 * 300, generator=g) * 3).bfloat16()
    gate, up = gate_up.float().split(300, dim=-1)
    want = (activation_ops.act_fp32(gate, act) * up).bfloat16()
    got = activation_ops.gated_act_bf16(gate_up, 300, act)
    assert got.dtype == torch.bfloat16 and got.shape == (64, 300)
    torch.testing.assert_close(got.float(), want.float(), rtol=2.0 ** -7, atol=1e-4)  # a bf16 unit, or cancellation
    same = (got == want).float().mean()
    assert same >= (0.999 if act == "silu" else 0.97)
    bf16_gate, bf16_up = gate_up.split(300, dim=-1)
    assert (activation_ops.act_fp32(bf16_gate, act) * bf16_up == want).float().mean() < same


def test_without_the_kernel_the_activation_is_torch_fp32_rounded_once(monkeypatch):
    monkeypatch.setattr(libraries, "gated_act", lambda: None)
    gate_up = torch.randn(8, 2 * 40).bfloat16()
    gate, up = gate_up.float().split(40, dim=-1)
    want = (activation_ops.act_fp32(gate, "silu") * up).bfloat16()
    assert torch.equal(activation_ops.gated_act_bf16(gate_up, 40, "silu"), want)


def test_a_bf16_mlp_step_is_the_bf16_ops_in_order(tiny_dirs, vnni_bf16_cpu):
    """What the bf16 MLP computes on torch's tile GEMM, bit for bit: bf16 x through the bf16 GEMMs, the fused
    activation on their bf16 output, the result returned in x's dtype (fp32)."""
    model = _model(tiny_dirs, "int4", env={"TUNESERVE_TILE_GEMM": "torch"}, quant_activations="bf16")
    mlp = _mlps(model)[0]  # no int8 kernel: the fake CPU has none
    x = torch.randn(64, mlp.gate_up_proj.in_features)
    assert mlp.bf16_between(64)
    w_gu, w_d = mlp.gate_up_proj.dequantize().bfloat16(), mlp.down_proj.dequantize().bfloat16()
    h = activation_ops.gated_act_bf16(x.bfloat16() @ w_gu.t(), mlp.inter, mlp.act)
    want = (h @ w_d.t()).float()
    with torch.inference_mode():
        got = mlp(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.skipif(libraries.amx_matmul() is None, reason="needs the AMX tile GEMM")
def test_on_amx_the_bf16_mlp_is_the_fp32_mlp(tiny_dirs, vnni_bf16_cpu, monkeypatch):
    """On the AMX GEMM, gate|up's sums stay fp32 into the fused activation, so the bf16 MLP rounds exactly where
    the fp32 one does (x and down's input, for the tiles): the same values but for the kernel's rare one-unit
    differences in act."""
    mlp = _mlps(_model(tiny_dirs, "int4", quant_activations="bf16"))[0]
    x = torch.randn(64, mlp.gate_up_proj.in_features)
    with torch.inference_mode():
        on = mlp(x)
        monkeypatch.setattr(GatedMLP, "bf16_between", lambda self, rows: False)
        off = mlp(x)
    assert (on == off).float().mean() >= 0.99
    torch.testing.assert_close(on, off, rtol=0, atol=1e-2 * float(off.abs().max()))


@pytest.mark.skipif(not (quant_ops.int8_kernels_available() and quant_ops.native_bf16()),
                    reason="needs the int8 kernels and a native-bf16 CPU (where the default takes bf16 tiles)")
def test_bf16_between_on_equals_off(tiny_dirs, monkeypatch):
    """The on == off test: the same int4 model's prompt logits with the MLP bf16 between its matmuls (on, the
    default here at 64 rows; the fused activation really ran) and in fp32 (off): the same values but for the
    kernel's rare one-unit differences in act; at 20 rows, below the tiles, bit-equal. On torch's tile GEMM,
    whose output is bf16 either way (AMX's fp32 output would make off the more precise of the two)."""
    for name in ("TUNESERVE_KERNELS", "TUNESERVE_QUANT_ACT"):
        monkeypatch.delenv(name, raising=False)
    model = _model(tiny_dirs, "int4", env={"TUNESERVE_TILE_GEMM": "torch"})
    calls = []
    real = activation_ops.gated_act_bf16
    monkeypatch.setattr("tuneserve.models.layers.gated_act_bf16", lambda *a: calls.append(a[0].shape) or real(*a))

    def logits(n: int) -> torch.Tensor:
        ids = torch.arange(3, 3 + n) % 250 + 3
        ctx = fresh_context(model.arch, [n], torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            return model.compute_logits(model(ids, ctx))

    on, on20 = logits(64), logits(20)
    assert len(calls) == len(_mlps(model)) and all(shape[0] == 64 for shape in calls)
    monkeypatch.setattr(GatedMLP, "bf16_between", lambda self, rows: False)
    off, off20 = logits(64), logits(20)
    assert (on.argmax(-1) == off.argmax(-1)).all()
    torch.testing.assert_close(on, off, rtol=0, atol=1e-2 * float(off.abs().max()))
    assert torch.equal(on20, off20)
