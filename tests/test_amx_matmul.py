"""The bf16 tiles' GEMM on AMX (csrc/amx_matmul.c, config tile_gemm="amx"): the products of bf16 x and the
bf16-dequantized weights, summed in fp32 and rounded once; each row's bits independent of the batch; chosen
where it runs and turned off by TUNESERVE_TILE_GEMM=torch; on == off at the model level."""

import dataclasses

import pytest
import torch
from conftest import packed_weights

from tuneserve.calibration.calibrate import fresh_context
from tuneserve.kernels import libraries, quant_ops
from tuneserve.kernels.config import CpuFeatures, bind_kernels, resolve
from tuneserve.loading import load_model
from tuneserve.weights import open_checkpoint

amx = pytest.mark.skipif(libraries.amx_matmul() is None, reason="needs AMX and the kernel's permission to use it")


def _packed(n: int, k: int, bits: int, seed: int = 0):
    return packed_weights(n, k, bits, seed, group=64 if bits == 8 else 32)


def _amx_config():
    cfg = resolve(quant_activations="bf16", env={})
    assert cfg.tile_gemm == "amx"
    return cfg


@amx
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m,k,n", [(16, 64, 16), (31, 128, 48), (32, 64, 32), (77, 896, 1152), (130, 256, 80),
                                   (40, 896, 1200)])  # panels of 128 features, the last of 48 (3 B groups)
@pytest.mark.parametrize("bias", [False, True])
def test_amx_is_the_bf16_products_summed_in_fp32(bits, m, k, n, bias):
    """Against float64 sums of the same bf16 products: within fp32 summation error; the bf16 output is the
    fp32 output rounded once (bias added before the rounding)."""
    qw, sc, mn = _packed(n, k, bits)
    x = torch.randn(m, k)
    b = torch.randn(n) if bias else None
    cfg = _amx_config()
    got = quant_ops.matmul(x, qw, sc, mn, b, kernels=cfg, int8_ok=False)
    w = quant_ops.dequant_rows(qw, sc, mn, dtype=torch.bfloat16).double()
    xb = x.bfloat16().double()
    want = xb @ w.t() + (b.double() if bias else 0)
    bound = (xb.abs() @ w.abs().t()) * (k * 2 ** -23) + 1e-6
    assert got.dtype == torch.float32 and ((got.double() - want).abs() <= bound).all()
    got16 = quant_ops.matmul(x.bfloat16(), qw, sc, mn, b, kernels=cfg, int8_ok=False, out_dtype=torch.bfloat16)
    assert torch.equal(got16, got.bfloat16())


@amx
@pytest.mark.parametrize("m,k,n", [(31, 128, 48), (77, 896, 1152)])
def test_amx_takes_int5_high_bits(m, k, n):
    """int5 (q4 codes plus high-bit words): the same bound against the bf16 products of its dequantized rows."""
    qw, sc, mn = _packed(n, k, 4)
    qh = torch.randint(-2**31, 2**31 - 1, (n, k // 32), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    x = torch.randn(m, k)
    got = quant_ops.matmul(x, qw, sc, mn, kernels=_amx_config(), int8_ok=False, qhigh=qh)
    w = quant_ops.dequant_rows(qw, sc, mn, dtype=torch.bfloat16, qhigh=qh).double()
    assert not torch.equal(w, quant_ops.dequant_rows(qw, sc, mn, dtype=torch.bfloat16).double())
    xb = x.bfloat16().double()
    bound = (xb.abs() @ w.abs().t()) * (k * 2 ** -23) + 1e-6
    assert ((got.double() - xb @ w.t()).abs() <= bound).all()


@amx
@pytest.mark.parametrize("bits", [4, 8])
def test_a_row_has_the_same_bits_in_any_batch(bits):
    """Row m's sums depend on row m alone (the 32-row blocks and the zero-padded tail add in the same order):
    greedy under load equals greedy alone."""
    qw, sc, mn = _packed(96, 256, bits)
    x = torch.randn(100, 256)
    cfg = _amx_config()
    whole = quant_ops.matmul(x, qw, sc, mn, kernels=cfg, int8_ok=False)
    for lo, hi in ((0, 16), (5, 37), (64, 100), (70, 100)):
        assert torch.equal(quant_ops.matmul(x[lo:hi], qw, sc, mn, kernels=cfg, int8_ok=False), whole[lo:hi])


@amx
def test_shapes_amx_does_not_take_use_torch_gemm():
    """N % 16 != 0: the dequantized tiles and torch's GEMM, exactly as with tile_gemm="torch"."""
    qw, sc, mn = _packed(40, 64, 4)
    x = torch.randn(20, 64)
    cfg = _amx_config()
    got = quant_ops.matmul(x, qw, sc, mn, kernels=cfg, int8_ok=False)
    assert torch.equal(got, quant_ops.matmul(x, qw, sc, mn, kernels=dataclasses.replace(cfg, tile_gemm="torch"),
                                             int8_ok=False))


def test_tile_gemm_is_amx_exactly_where_it_runs():
    """auto: amx where the kernel is available and the CPU has AMX; TUNESERVE_TILE_GEMM=torch turns it off; an
    unknown value is an error that names the variable."""
    runs = quant_ops.compiled_available() and CpuFeatures.detect().amx_bf16 and libraries.amx_matmul() is not None
    assert resolve(env={}).tile_gemm == ("amx" if runs else "torch")
    assert resolve(env={"TUNESERVE_TILE_GEMM": "amx"}).tile_gemm == ("amx" if runs else "torch")
    assert resolve(env={"TUNESERVE_TILE_GEMM": "torch"}).tile_gemm == "torch"
    assert resolve(kernels="portable", env={}).tile_gemm == "torch"
    with pytest.raises(ValueError, match="TUNESERVE_TILE_GEMM"):
        resolve(env={"TUNESERVE_TILE_GEMM": "onednn"})
    cfg = resolve(quant_activations="bf16", env={})
    assert ("tile-gemm=amx" in cfg.describe()) == (cfg.tile_gemm == "amx")


@amx
def test_amx_on_equals_off(tiny_dirs, monkeypatch):
    """The on == off test: an int4 model's prompt logits at 64 rows (bf16 tiles) with the AMX GEMM (on) and with
    torch's (off), each against the fp32 path: AMX's error no larger than torch's (on this tiny random model,
    rounding x to bf16 moves logits by ~5% of their range either way), the same top-token agreement; the AMX
    kernel really ran. At 20 rows (int8 activations, no tiles) bit-equal."""
    path = str(tiny_dirs["llama"])
    on_cfg = resolve(kernels="unfused", env={})
    model = load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False,
                       quantization="int4", kernels=on_cfg)
    calls = []
    real = quant_ops._amx_matmul
    monkeypatch.setattr(quant_ops, "_amx_matmul", lambda *a: calls.append(a[0].shape[0]) or real(*a))

    def logits(n: int, cfg) -> torch.Tensor:
        bind_kernels(model, cfg)
        ids = torch.arange(3, 3 + n) % 250 + 3
        ctx = fresh_context(model.arch, [n], torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            return model.compute_logits(model(ids, ctx))

    on, on20 = logits(64, on_cfg), logits(20, on_cfg)
    assert calls and set(calls) == {64}
    calls.clear()
    off_cfg = dataclasses.replace(on_cfg, tile_gemm="torch")
    off, off20 = logits(64, off_cfg), logits(20, off_cfg)
    assert not calls
    assert torch.equal(on20, off20)
    ref = logits(64, resolve(kernels="unfused", quant_activations="fp32", env={}))
    assert (on - ref).abs().max() <= 1.5 * (off - ref).abs().max()
    agree = [int((y.argmax(-1) == ref.argmax(-1)).sum()) for y in (on, off)]
    assert agree[0] >= agree[1] - 2, agree


def test_tile_sums_of_concatenated_parts_are_the_parts_sums(vnni_bf16_cpu):
    """ConcatLinear (gate|up from parts in different formats) gives each part's tile sums side by side, in the
    dtype the tile GEMM sums in (fp32 on AMX, bf16 on torch's GEMM)."""
    from tuneserve.quant.linear import ConcatLinear, QuantLinear

    cfg = resolve(quant_activations="bf16", env={})
    parts = [QuantLinear(*_packed(48, 64, 4)), QuantLinear(*_packed(32, 64, 8, seed=1))]
    for p in parts:
        p.bind_kernels(cfg)
    x = torch.randn(20, 64).bfloat16()
    got = ConcatLinear(parts).tile_sums(x)
    assert got.dtype == (torch.float32 if cfg.tile_gemm == "amx" else torch.bfloat16)
    assert torch.equal(got, torch.cat([p.tile_sums(x) for p in parts], dim=-1))
