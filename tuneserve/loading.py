"""Loading a servable model: build it, fill it from the checkpoint, cast it, quantize it, bind its kernels.

This is where the layers below meet: models/ builds and fills, quant/ packs weights at load time
(round-to-nearest, GGUF-native blocks, quantized checkpoints), calibration/ runs the model to quantize
with GPTQ / AWQ, kernels/config.py decides once which kernels the finished model runs. Neither quant/ nor
models/ imports the other's heavier half.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from tuneserve.calibration.calibrate import calibration_windows
from tuneserve.calibration.sequential import quantize_sequential
from tuneserve.config import ArchConfig
from tuneserve.dtypes import DTYPES
from tuneserve.kernels.config import KernelConfig, bind_kernels, resolve
from tuneserve.log import log, quiet
from tuneserve.models.layers import Attention, Rotary
from tuneserve.models.loader import build_model, load_weights
from tuneserve.quant.apply import resolve_group_size, rtn_quantize
from tuneserve.quant.checkpoint import load_quantized, quant_kind
from tuneserve.quant.gguf_native import load_native, native_weights
from tuneserve.quant.recipe import METHODS, QuantRecipe, parse_quantization


def load_model(path: str, arch: ArchConfig, device: torch.device, dtype: str = "float32",
               progress: bool | None = None, quantization: str | None = None,
               kernels: KernelConfig | None = None) -> nn.Module:
    """Build the model for arch and fill it from the checkpoint at path (dequantized to fp32 first), then
    quantize it if asked (tuneserve/quant). A quantized checkpoint directory, given as path or as
    quantization, fills the model directly with its packed weights. Finally every layer is bound to
    kernels (None: `kernels.config.resolve()`, i.e. the environment's fallback, else the machine's
    fastest), which is logged."""
    if progress is None:  # progress bars unless the user asked for quiet
        progress = not quiet()
    model = build_model(arch, device)
    qdir = quantization if quantization and quant_kind(quantization) else (path if quant_kind(path) else None)
    native = None
    if quantization == "gguf" and Path(path).is_file():  # what is served from its blocks is never dequantized
        native = native_weights(path, arch.num_layers, not arch.tie_word_embeddings)
    if qdir is None:
        load_weights(model, path, arch, progress, native)
    if dtype != "float32":
        model = model.to(DTYPES[dtype])
        for m in model.modules():
            if isinstance(m, Rotary):  # rope tables stay fp32: positions up to 32k need the precision
                m.cos, m.sin = m.cos.float(), m.sin.float()
    kernels = kernels or resolve()
    if qdir is not None or quantization is not None:
        _quantize(model, str(qdir or quantization), path, progress)
    bind_kernels(model, kernels)
    line = kernels.describe(attention_paths(model, kernels, dtype, device), decode_path(model, dtype),
                            prompt_paths(model, dtype))
    log(f"kernels: {line}")
    return model.eval()


def decode_path(model: nn.Module, dtype: str) -> str | None:
    """What the model's decode steps run once bound: 'fused', or 'layers(why)' where the configuration chose
    the fused step and the model does not take it (None: the configuration's choice, 'layers')."""
    fused = getattr(model, "fused", None)
    if fused is None:
        return None
    why = "dtype " + dtype if dtype != "float32" else fused.refusal()
    return f"layers({why})" if why else "fused"


def prompt_paths(model: nn.Module, dtype: str = "float32") -> str | None:
    """What the model's attention layers do with prompt chunks once bound (Attention.prompt_path): one
    choice, or each with its count of layers; None: no attention layers."""
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    return _layer_counts([m.prompt_path(short) for m in model.modules() if isinstance(m, Attention)], None)


def attention_paths(model: nn.Module, kernels: KernelConfig, dtype: str, device: torch.device) -> str:
    """What the model's attention layers run on short queries once bound: one path, or each path with its
    count of layers ('compiled(avx2):20,torch(soft-capping):4'). The compiled kernel takes only fp32 CPU
    tensors and no soft-capping (kernels/attention.py), so a config that chose it does not say what runs."""
    paths = [_attention_path(m, kernels, dtype, device) for m in model.modules() if isinstance(m, Attention)]
    return _layer_counts(paths, kernels.label(kernels.attention))


def _layer_counts(paths: list[str], default: str | None) -> str | None:
    """Per-layer paths as the start-up line gives them: the one path, or each with its count of layers in
    first-seen order ('compiled(avx2):20,torch(soft-capping):4'); default where there are none."""
    runs = Counter(paths)
    if len(runs) <= 1:
        return next(iter(runs), default)
    return ",".join(f"{path}:{n}" for path, n in runs.items())


def _attention_path(layer: Attention, kernels: KernelConfig, dtype: str, device: torch.device) -> str:
    if kernels.attention != "compiled":
        return kernels.label(kernels.attention)
    if not layer.compiled_attention:  # what Attention.bind_kernels refuses the kernel for
        return "torch(soft-capping)" if layer.softcap else f"torch(head-size-{layer.d})"
    if device.type != "cpu":
        return f"torch({device.type})"
    return kernels.label("compiled") if dtype == "float32" else f"torch({dtype})"


def quantize_model(model: nn.Module, quantization: str, checkpoint_path: str | None = None,
                   progress: bool = True, kernels: KernelConfig | None = None, **overrides: object) -> dict:
    """Quantize model in place as `quantization` names it (recipe options in the string or overrides) and
    bind its layers to kernels (None: `kernels.config.resolve()`); returns a report (what was done,
    fallbacks)."""
    report = _quantize(model, quantization, checkpoint_path, progress, **overrides)
    bind_kernels(model, kernels or resolve())
    return report


def _quantize(model: nn.Module, quantization: str, checkpoint_path: str | None, progress: bool,
              **overrides: object) -> dict:
    if quantization == "gguf":
        if checkpoint_path is None or Path(checkpoint_path).is_dir():
            raise ValueError("quantization='gguf' needs a GGUF model file (it keeps the file's own blocks)")
        report = load_native(model, checkpoint_path, progress)
        log(f"gguf native: {report['native']} tensors kept in their blocks, {report['repacked']} repacked to the "
            f"kernels' int8 / int4 blocks; "
            f"{len(report['fallback'])} dequantized to fp32: {report['fallback_summary']}")
        return report
    if quantization not in METHODS and Path(quantization).is_dir():
        return load_quantized(model, quantization)
    spec = parse_quantization(quantization, **overrides)
    return quantize_with_recipe(model, spec, checkpoint_path, progress)


def quantize_with_recipe(model: nn.Module, spec: QuantRecipe, checkpoint_path: str | None = None,
                         progress: bool = True, tokenizer: object = None) -> dict:
    """Quantize model in place with an explicit recipe; calibration text for GPTQ/AWQ is tokenized with
    `tokenizer` (default: the checkpoint's own). The new layers are not bound to a KernelConfig (they
    run `kernels.config.detected()` until `bind_kernels`)."""
    if spec.method != "rtn" and model.arch.num_experts:  # calibration runs one MLP per layer, not routed ones
        raise ValueError(f"{spec.method} calibration of a mixture-of-experts model is not supported; use "
                         "int8 or int4 (round to nearest)")
    spec = resolve_group_size(model, spec)
    if spec.method == "rtn":
        rtn_quantize(model, spec, progress)
        return {"spec": spec.to_dict()}
    if tokenizer is None:
        if checkpoint_path is None:
            raise ValueError(f"{spec.method} needs calibration text: pass checkpoint_path or tokenizer")
        from tuneserve.tokenizer import load_tokenizer  # transformers: 2 s to import, a rank needs it only here

        tokenizer = load_tokenizer(checkpoint_path)
    windows = calibration_windows(tokenizer, spec.corpus, spec.samples, spec.seq_len, spec.seed)
    log(f"{spec.method}-int{spec.bits} g{spec.group_size}: calibrating on {len(windows)} x {spec.seq_len} "
        f"tokens of {spec.corpus!r}")
    stats = quantize_sequential(model, spec, windows, progress)
    return {"spec": spec.to_dict(), **stats}
