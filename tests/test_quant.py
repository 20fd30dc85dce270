"""Quantization formats: packing, round-to-nearest error bounds, quantized modules, group-size checks."""

import pytest
import torch
from torch import nn

from tuneserve.kernels import quant_ops as Q
from tuneserve.kernels.config import resolve
from tuneserve.quant.apply import pack_weight, resolve_group_size, rtn_quantize
from tuneserve.quant.linear import QuantEmbedding, QuantLinear, model_weight_bytes
from tuneserve.quant.recipe import QuantRecipe, fitting_group_sizes, parse_quantization
from tuneserve.quant.rtn import quantize_int4, quantize_int8, search_params


def test_int4_pack_unpack_round_trip_is_exact():
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 32), (7, 64), (33, 576)]:
        q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
        packed = Q.pack_int4(q)
        assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
        assert torch.equal(Q.unpack_int4(packed), q)
    # the block layout: byte j of a 32-input block holds input j (low nibble) and input j + 16 (high)
    q = torch.arange(32, dtype=torch.uint8).remainder(16).view(1, 32)
    assert Q.pack_int4(q)[0, 3] == (3 | (3 << 4)) and Q.pack_int4(q)[0, 0] == 0
    with pytest.raises(ValueError, match="multiple of 32"):
        Q.pack_int4(torch.zeros(2, 48, dtype=torch.uint8))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_rtn_error_within_half_a_step(group, symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 256, generator=g) * 0.1
    packed, s, m = quantize_int4(w, group, symmetric)
    assert s.shape == (24, 256 // group) and s.dtype == torch.float16
    w_hat = Q.dequant_portable(packed, s, m)
    step = s.float().repeat_interleave(group, dim=1)
    err = (w_hat - w).abs()
    if symmetric:  # [-8 s, 7 s] with s = amax / 7: nothing is clipped
        assert bool((err <= step / 2 + 1e-6).all())
    else:  # the range covers [min, max]; fp16 rounding of the min can add a little
        assert bool((err <= step / 2 + step * 2e-3 + 1e-6).all())
    assert err.mean() < step.mean() / 3


def test_int8_rtn_error_within_half_a_step():
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(2))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (16, 1) and s.dtype == torch.float32
    w_hat = Q.dequant_portable(q, s, None)
    assert bool(((w_hat - w).abs() <= s / 2 + 1e-7).all())
    q, s = quantize_int8(w, 32)
    assert s.shape == (16, 3) and s.dtype == torch.float16
    step = s.float().repeat_interleave(32, 1)
    assert bool(((Q.dequant_portable(q, s, None) - w).abs() <= step / 2 + 1e-6).all())


def test_clipping_search_never_worse_than_full_range():
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    w[:, 0] *= 8  # an outlier per group: clipping it helps the rest
    full = Q.dequant_portable(*quantize_int4(w, 64))
    s, m = search_params(w, 4)
    q = ((w - m.float()[:, None]) / s.float()[:, None]).round().clamp(0, 15)
    searched = q * s.float()[:, None] + m.float()[:, None]
    assert (searched - w).pow(2).sum(1).le((full - w).pow(2).sum(1) + 1e-6).all()


@pytest.fixture
def fp32_activations():
    """A kernel configuration with exact fp32 activations on every path, for the layers to be bound to (the
    int8 / bf16 activation paths are tested against their own oracle in test_quant_kernels.py)."""
    return resolve(quant_activations="fp32")


@pytest.mark.parametrize("bits", [4, 8])
def test_quant_linear_matches_its_dequantized_weight(bits, fp32_activations):
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(40, 128, generator=g), torch.randn(40, generator=g)
    layer = pack_weight(w, QuantRecipe(bits=bits, group_size=64 if bits == 4 else None), bias=b)
    assert isinstance(layer, QuantLinear) and layer.bits == bits
    layer.bind_kernels(fp32_activations)
    x = torch.randn(3, 5, 128, generator=g)
    ref = x @ layer.dequantize().t() + b
    for path in ("auto", "portable"):
        layer.path = path
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    assert not any(p.is_floating_point() and p.numel() == w.numel() for p in layer.buffers())  # no fp copy


def test_quant_embedding_lookup_and_tied_logits(fp32_activations):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 64, generator=g)
    emb = pack_weight(w, QuantRecipe(bits=4, group_size=32), embedding=True)
    assert isinstance(emb, QuantEmbedding)
    emb.bind_kernels(fp32_activations)
    full = emb.dequantize()
    ids = torch.tensor([0, 299, 7, 7, 150])
    torch.testing.assert_close(emb(ids), full[ids])
    h = torch.randn(4, 64, generator=g)
    torch.testing.assert_close(emb.logits(h), h @ full.t(), rtol=1e-4, atol=1e-4)


def test_rtn_model_quantizes_embedding_and_head_and_counts_bytes(tiny_dirs):
    from tuneserve.loading import load_model
    from tuneserve.weights import open_checkpoint

    path = str(tiny_dirs["qwen2"])
    arch = open_checkpoint(path).arch_config()
    model = load_model(path, arch, torch.device("cpu"), progress=False)
    fp32 = model_weight_bytes(model)
    rtn_quantize(model, resolve_group_size(model, QuantRecipe(bits=4)), progress=False)
    assert isinstance(model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.layers[0].self_attn.qkv_proj.bias is not None  # qwen2's q/k/v biases survive
    assert model_weight_bytes(model) < 0.25 * fp32


def test_group_size_must_fit_every_layer(tiny_dirs):
    from tuneserve.loading import load_model
    from tuneserve.weights import open_checkpoint

    path = str(tiny_dirs["llama"])
    model = load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False)
    assert resolve_group_size(model, QuantRecipe(bits=4)).group_size == 64  # hidden 64, intermediate 128
    with pytest.raises(ValueError, match=r"group size 128 does not fit the input size 64 .*: 32, 64"):
        resolve_group_size(model, QuantRecipe(bits=4, group_size=128))
    with pytest.raises(ValueError, match="32-input blocks"):
        resolve_group_size(model, QuantRecipe(bits=4, group_size=16))
    assert fitting_group_sizes([576, 1536], 4) == [32, 64, 96, 192]  # SmolLM2: g128 does not fit
    assert 128 in fitting_group_sizes([896, 4864], 4)  # Qwen2.5-0.5B


def test_parse_quantization_names_and_options(monkeypatch):
    assert parse_quantization("gptq-int4").method == "gptq"
    assert parse_quantization("int8").bits == 8
    spec = parse_quantization("awq-int4:samples=7:g64:act_order=0", group_size=32)  # explicit kwargs win
    assert (spec.samples, spec.group_size, spec.act_order) == (7, 32, False)
    assert parse_quantization("int4:g64").group_size == 64
    with pytest.raises(ValueError, match="unknown quantization"):
        parse_quantization("int3")
    with pytest.raises(ValueError, match="option 'sample=7'"):
        parse_quantization("int4:sample=7")
    assert parse_quantization("awq-int4").awq_rounding == "gptq"
    monkeypatch.setenv("TUNESERVE_QUANT_AWQ_ROUNDING", "rtn")  # no longer read: it never silently overrides
    assert parse_quantization("awq-int4").awq_rounding == "gptq"
    assert parse_quantization("awq-int4:awq_rounding=rtn").awq_rounding == "rtn"
    with pytest.raises(ValueError, match="use 'rtn' or 'gptq'"):
        parse_quantization("awq-int4", awq_rounding="nearest")


def test_calibration_windows_split_between_joined_corpora(tmp_path):
    from tuneserve.calibration.calibrate import calibration_windows

    class Tok:  # one id per character: windows are slices of the text's code points
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a" * 400)
    b.write_text("b" * 400)
    windows = calibration_windows(Tok(), f"{a}+{b}", 5, 16, seed=0)
    assert [chr(w[0]) for w in windows] == ["a", "b", "a", "b", "a"]  # interleaved, the first takes the remainder
    assert all(len(w) == 16 and len(set(w)) == 1 for w in windows)
    plus = tmp_path / "x+y.txt"  # an existing file whose name has a '+' is one corpus
    plus.write_text("c" * 400)
    assert {chr(w[0]) for w in calibration_windows(Tok(), str(plus), 3, 16)} == {"c"}


def test_awq_search_minimises_the_given_block_loss():
    from tuneserve.calibration.awq import _quant_dequant, awq_search

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 4, 64)
    h, abs_mean = x.t() @ x / 256, x.abs().mean(0)
    target = torch.randn(16, 16, generator=g)  # a "block" whose output error is not the layer's own

    def loss(w_hat):
        return float(((x @ (w_hat - w).t() @ target) ** 2).sum())

    errors = []
    for i in range(21):
        s = abs_mean.pow(i / 20)
        s = s / (s.max() * s.min()).sqrt()
        errors.append(loss(_quant_dequant(w * s, 4, 32, False, None, False)[0] / s))
    _, alpha = awq_search(w, h, abs_mean, 4, 32, loss=loss)
    assert alpha == errors.index(min(errors)) / 20


@pytest.mark.parametrize("method,rounding,target", [("awq", "rtn", "awq_quantize"), ("awq", "gptq", "gptq_quantize"),
                                                     ("gptq", "gptq", "gptq_quantize")])
def test_every_projection_but_gate_up_is_clipped(tiny_dirs, monkeypatch, method, rounding, target):
    """Clipping gate|up's ranges cost Qwen perplexity (see sequential.UNCLIPPED); the rest are clipped."""
    from tuneserve.calibration import sequential
    from tuneserve.loading import load_model
    from tuneserve.weights import open_checkpoint

    src = str(tiny_dirs["qwen2"])
    model = load_model(src, open_checkpoint(src).arch_config(), torch.device("cpu"), progress=False)
    names, clips = [], {}  # modules in order; module -> clip_search of each rounding call
    real_quantize, real = sequential.Calibrator.quantize, getattr(sequential, target)

    def quantize(self, name, *a, **k):
        names.append(name)
        return real_quantize(self, name, *a, **k)

    def rounding_call(*a):
        clips.setdefault(names[-1], set()).add(a[7])  # clip_search, the eighth argument of both
        return real(*a)

    monkeypatch.setattr(sequential.Calibrator, "quantize", quantize)
    monkeypatch.setattr(sequential, target, rounding_call)
    windows = [[(7 * i + j) % 50 + 3 for j in range(32)] for i in range(4)]
    spec = QuantRecipe(method=method, bits=4, group_size=32, awq_rounding=rounding)
    sequential.quantize_sequential(model, spec, windows, progress=False)
    assert len(names) == len(clips) == 4 * len(model.layers) + 1
    assert [n for n in names if clips[n] == {False}] == [f"layers.{i}.mlp.gate_up_proj"
                                                         for i in range(len(model.layers))]
    assert all(clips[n] == {True} for n in names if not n.endswith("gate_up_proj"))


@pytest.mark.parametrize("prefer_scaled", [True, False])
def test_awq_gptq_rounding_keeps_the_candidate_with_the_lower_loss(monkeypatch, prefer_scaled):
    """With GPTQ rounding, AWQ's scales are kept only where GPTQ on the scaled weight beats GPTQ on the plain one."""
    from types import SimpleNamespace

    from tuneserve.calibration import sequential
    from tuneserve.calibration.awq import scaled_hessian
    from tuneserve.calibration.calibrate import InputStats
    from tuneserve.calibration.gptq import gptq_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    st = InputStats(64)
    st.add(torch.randn(256, 64, generator=g) * torch.linspace(0.1, 4, 64))
    h = st.hessian
    s = torch.linspace(0.5, 2.0, 64)
    monkeypatch.setattr(sequential, "awq_search", lambda *a, **k: (s, 0.5))
    spec = QuantRecipe(method="awq", bits=4, group_size=32, awq_rounding="gptq")
    scaled = gptq_quantize(w * s, scaled_hessian(h, s), 4, 32, False, True, spec.damp, True)["w_hat"] / s
    plain = gptq_quantize(w, h, 4, 32, False, True, spec.damp, True)["w_hat"]
    want = scaled if prefer_scaled else plain
    r = sequential.Calibrator._awq_gptq(SimpleNamespace(spec=spec), w, h, st, 32, False, True,
                                        lambda w_hat: float((w_hat - want).abs().sum()))
    assert torch.equal(r["w_hat"], want)
    assert torch.equal(r["s"], s if prefer_scaled else torch.ones(64))
