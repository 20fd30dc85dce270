"""The kernels start-up line says what the attention layers run: a soft-capped Gemma 2 layer attends on the
torch path whatever the config chose (kernels/attention.py), and so does a bf16 model."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_family

from tuneserve.kernels.config import CpuFeatures, KernelConfig, bind_kernels
from tuneserve.loading import attention_paths, load_model
from tuneserve.models.layers import Attention
from tuneserve.weights import open_checkpoint

# what the machine offers is pinned, so the line is the same on every CPU and with or without a C compiler
COMPILED = KernelConfig(dense="compiled", quant="compiled", attention="compiled", features=CpuFeatures(avx2=True))
LINE = ("[tuneserve] kernels: dense=compiled(avx2) quant=compiled(avx2) quant-act=fp32 attention={} decode=layers "
        "prompt-attention={} cpu=avx2\n")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kernel-line")
    gemma2 = dict(head_dim=16, sliding_window=24, query_pre_attn_scalar=16, final_logit_softcapping=3.0)
    return {"gemma2": str(build_family(root / "gemma2", "gemma2", attn_logit_softcapping=5.0, **gemma2)),
            "gemma2-uncapped": str(build_family(root / "gemma2-uncapped", "gemma2", attn_logit_softcapping=None,
                                                **gemma2)),
            "llama": str(build_family(root / "llama", "llama"))}


def _load_logged(path: str, capsys, monkeypatch, kernels: KernelConfig = COMPILED, dtype: str = "float32"):
    monkeypatch.delenv("TUNESERVE_QUIET", raising=False)
    capsys.readouterr()
    model = load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), dtype, progress=False,
                       kernels=kernels)
    lines = [line for line in capsys.readouterr().err.splitlines(keepends=True) if "kernels:" in line]
    return model, lines


def _attention(model) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def test_soft_capped_gemma2_logs_the_torch_attention_it_runs(dirs, capsys, monkeypatch):
    model, lines = _load_logged(dirs["gemma2"], capsys, monkeypatch)
    assert lines == [LINE.format("torch(soft-capping)", "fp32(soft-capping)")]
    layers = _attention(model)
    assert len(layers) == 2 and all(m.softcap == 5.0 and m.compiled_attention is False for m in layers)


def test_gemma2_without_capping_logs_the_compiled_kernel(dirs, capsys, monkeypatch):
    model, lines = _load_logged(dirs["gemma2-uncapped"], capsys, monkeypatch)
    assert lines == [LINE.format("compiled(avx2)", "fp32(no-bf16-tiles)")]
    assert all(m.compiled_attention is True for m in _attention(model))


def test_bf16_and_portable_attend_on_torch(dirs, capsys, monkeypatch):
    _, lines = _load_logged(dirs["llama"], capsys, monkeypatch, dtype="bfloat16")
    assert lines == [LINE.format("torch(bfloat16)", "bf16(dtype)")]  # the kernel takes fp32 only
    _, lines = _load_logged(dirs["llama"], capsys, monkeypatch, kernels=KernelConfig(features=CpuFeatures(avx2=True)))
    assert lines == ["[tuneserve] kernels: dense=torch quant=portable quant-act=fp32 attention=torch decode=layers "
                     "prompt-attention=fp32(no-bf16-tiles) cpu=avx2\n"]


def test_layers_on_different_paths_are_counted_in_layer_order(dirs):
    path = dirs["llama"]
    model = load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False,
                       kernels=COMPILED)
    _attention(model)[0].softcap = 5.0
    bind_kernels(model, COMPILED)  # the capped layer gives up the kernel on binding
    assert attention_paths(model, COMPILED, "float32", torch.device("cpu")) == "torch(soft-capping):1,compiled(avx2):1"
