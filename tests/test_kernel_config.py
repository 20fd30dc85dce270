"""KernelConfig: resolved once (explicit > environment > machine), bound to every layer at load, and the
portable path computing what the compiled kernels compute."""

import os

import pytest
import torch

from tuneserve.calibration.calibrate import fresh_context
from tuneserve.engine_args import EngineArgs
from tuneserve.kernels import attention as A
from tuneserve.kernels import decode_step, dense_ops, libraries, quant_ops
from tuneserve.kernels.config import CpuFeatures, KernelConfig, resolve
from tuneserve.kernels.dense_ops import DenseLinear
from tuneserve.loading import load_model
from tuneserve.models.layers import Attention
from tuneserve.quant.linear import QuantLinear
from tuneserve.weights import open_checkpoint

ENV = ("TUNESERVE_KERNELS", "TUNESERVE_QUANT_ACT")
needs_kernels = pytest.mark.skipif(not (dense_ops.available() and quant_ops.compiled_available()
                                        and A.compiled_available()), reason="no C compiler here")


@pytest.fixture(autouse=True)
def _no_kernel_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_explicit_choice_beats_the_environment_which_beats_auto(vnni_bf16_cpu):
    assert resolve(env={}).quant_act == "int8"  # auto: the fastest the machine runs
    assert resolve(env={"TUNESERVE_QUANT_ACT": "fp32"}).quant_act == "fp32"  # the fallback
    assert resolve(quant_activations="bf16", env={"TUNESERVE_QUANT_ACT": "fp32"}).quant_act == "bf16"
    assert resolve(env={"TUNESERVE_KERNELS": "portable"}) == KernelConfig(features=CpuFeatures.detect())
    assert resolve("portable", "int8", env={}).quant_act == "fp32"  # the portable path computes in fp32
    assert resolve(env={}).bf16_tiles and not resolve(quant_activations="fp32", env={}).bf16_tiles


def test_modes_fall_back_to_what_the_cpu_runs(monkeypatch):
    if not quant_ops.compiled_available():
        pytest.skip("no C compiler here")
    monkeypatch.setattr(CpuFeatures, "detect", staticmethod(lambda: CpuFeatures(avx2=True)))
    monkeypatch.setattr(libraries, "qmatmul_vnni", lambda: None)
    assert {resolve(quant_activations=a, env={}).quant_act for a in ("auto", "int8", "bf16")} == {"fp32"}


def test_the_default_reads_os_environ(monkeypatch):
    monkeypatch.setenv("TUNESERVE_KERNELS", "portable")
    assert resolve().quant == "portable" and resolve().dense == "torch" and resolve().attention == "torch"


@pytest.mark.parametrize("call,name", [
    (lambda: resolve(kernels="fast"), "kernels"),
    (lambda: resolve(quant_activations="int4"), "quant_activations"),
    (lambda: resolve(env={"TUNESERVE_QUANT_ACT": "fp16"}), "TUNESERVE_QUANT_ACT"),
    (lambda: EngineArgs(kernels="compiled").create_engine_config(), "kernels"),
    (lambda: EngineArgs(quant_activations="fp8").create_engine_config(), "quant_activations"),
])
def test_invalid_values_name_the_setting_and_the_choices(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must be one of .*'auto'"):
        call()


def test_engine_args_are_cli_flags():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(["--kernels", "portable", "--quant-activations", "fp32"])
    args = EngineArgs.from_cli_args(ns)
    assert (args.kernels, args.quant_activations) == ("portable", "fp32")


def _load(tiny_dirs, kernels, quantization=None):
    path = str(tiny_dirs["qwen2"])  # untied head: the logits go through a bound layer too
    return load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False,
                      quantization=quantization, kernels=kernels)


def _logits(model):
    ids = torch.tensor([5, 80, 13, 200, 7, 41, 9, 100, 3, 66, 12, 250, 30, 4])
    ctx = fresh_context(model.arch, [5, 9], torch.device("cpu"), torch.float32)  # short queries: every kernel
    with torch.inference_mode():
        return model.compute_logits(model(ids, ctx))


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_every_layer_carries_the_configuration_after_load(tiny_dirs, quantization):
    cfg = resolve("portable")
    model = _load(tiny_dirs, cfg, quantization)
    assert model.kernels is cfg
    mods = list(model.modules())
    assert all(m.compiled is False for m in mods if isinstance(m, DenseLinear))
    assert all(m.compiled_attention is False for m in mods if isinstance(m, Attention))
    quant = [m for m in mods if isinstance(m, QuantLinear)]
    assert bool(quant) == (quantization is not None) and all(m.kernels is cfg for m in quant)


@needs_kernels
@pytest.mark.parametrize("kernels", ["unfused", "auto"])
@pytest.mark.parametrize("quantization", [None, "int4", "int8"])
def test_portable_equals_compiled(tiny_dirs, quantization, kernels, monkeypatch):
    """The on == off test of `kernels`: the same logits within fp32 tolerance, with the kernels really used
    (op by op, or all layers in the fused decode step)."""
    calls = []
    real_attention, real_step = A.short_attention_c, decode_step.run
    monkeypatch.setattr(A, "short_attention_c", lambda *a: calls.append("attention") or real_attention(*a))
    monkeypatch.setattr(decode_step, "run", lambda *a: calls.append("fused") or real_step(*a))
    compiled = resolve(kernels, quant_activations="fp32")
    assert (compiled.dense, compiled.quant, compiled.attention) == ("compiled",) * 3
    assert compiled.decode == ("layers" if kernels == "unfused" else "fused")
    want = _logits(_load(tiny_dirs, resolve("portable"), quantization))
    assert not calls
    got = _logits(_load(tiny_dirs, compiled, quantization))
    assert set(calls) == {"attention" if kernels == "unfused" else "fused"}
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class _EnvSpy(dict):
    """os.environ stand-in that records which TUNESERVE_ kernel variables are looked up."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def get(self, key, default=None):
        self.seen.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.seen.append(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.append(key)
        return super().__contains__(key)


@needs_kernels
def test_a_forward_does_not_consult_the_environment(tiny_dirs, monkeypatch):
    model = _load(tiny_dirs, None, "int4")  # resolved from the (empty) environment: the compiled kernels
    before = _logits(model)
    spy = _EnvSpy(os.environ, TUNESERVE_KERNELS="portable", TUNESERVE_QUANT_ACT="fp32")
    monkeypatch.setattr(os, "environ", spy)
    calls = []
    real = decode_step.run
    monkeypatch.setattr(decode_step, "run", lambda *a: calls.append(1) or real(*a))
    after = _logits(model)
    assert calls  # still the fused step of compiled kernels the model was loaded with
    assert torch.equal(after, before)
    assert not [k for k in spy.seen if k in ENV]
