"""Weight quantization: int8 / int4 round-to-nearest, GPTQ, AWQ, GGUF-native blocks, checkpoints.

`quantize_model(model, "int4")` swaps the model's linear layers, token embedding and (untied) LM head for
packed modules (quant/linear.py) in place. Names (EngineArgs.quantization):
  int8       weight-only, symmetric, one fp32 scale per output channel
  int4       groups of 32/64/128 inputs, asymmetric (fp16 scale and min per group), round-to-nearest
  gptq-int4 / gptq-int8   Hessian-based error compensation on calibration text (quant/gptq.py)
  awq-int4   activation-aware per-input-channel scales, then group-wise int4 (quant/awq.py)
  gguf       keep a GGUF file's own blocks (Q4_1, Q8_0, ...) and compute from them (quant/gguf_native.py)
  DIR        a checkpoint written by `tuneserve quantize` or an HF GPTQ/AWQ directory (quant/checkpoint.py)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from torch import nn

from tuneserve.quant.spec import METHODS, QuantSpec, parse_quantization, resolve_group_size

__all__ = ["QuantSpec", "parse_quantization", "quantize_model", "quantize_with_spec"]


def _info(msg: str) -> None:
    if os.environ.get("TUNESERVE_QUIET") != "1":
        print(f"[tuneserve] {msg}", file=sys.stderr, flush=True)


def quantize_model(model: nn.Module, quantization: str, checkpoint_path: str | None = None,
                   progress: bool = True, **overrides: object) -> dict:
    """Quantize model in place as `quantization` names it; returns a report (what was done, fallbacks)."""
    if quantization == "gguf":
        from tuneserve.quant.gguf_native import load_native

        if checkpoint_path is None or Path(checkpoint_path).is_dir():
            raise ValueError("quantization='gguf' needs a GGUF model file (it keeps the file's own blocks)")
        report = load_native(model, checkpoint_path, progress)
        _info(f"gguf native: {report['native']} tensors kept in their blocks; "
              f"{len(report['fallback'])} dequantized to fp32: {report['fallback_summary']}")
        return report
    if quantization not in METHODS and Path(quantization).is_dir():
        from tuneserve.quant.checkpoint import load_quantized

        return load_quantized(model, quantization)
    spec = parse_quantization(quantization, **overrides)
    return quantize_with_spec(model, spec, checkpoint_path, progress)


def quantize_with_spec(model: nn.Module, spec: QuantSpec, checkpoint_path: str | None = None,
                       progress: bool = True, tokenizer: object = None) -> dict:
    """Quantize model in place with an explicit recipe; calibration text for GPTQ/AWQ is tokenized with
    `tokenizer` (default: the checkpoint's own)."""
    spec = resolve_group_size(model, spec)
    if spec.method == "rtn":
        from tuneserve.quant.apply import rtn_quantize

        rtn_quantize(model, spec, progress)
        return {"spec": spec.to_dict()}
    if tokenizer is None:
        if checkpoint_path is None:
            raise ValueError(f"{spec.method} needs calibration text: pass checkpoint_path or tokenizer")
        from tuneserve.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(checkpoint_path)
    from tuneserve.quant.calibrate import calibration_windows
    from tuneserve.quant.sequential import quantize_sequential

    windows = calibration_windows(tokenizer, spec.corpus, spec.samples, spec.seq_len, spec.seed)
    _info(f"{spec.method}-int{spec.bits} g{spec.group_size}: calibrating on {len(windows)} x {spec.seq_len} "
          f"tokens of {spec.corpus!r}")
    stats = quantize_sequential(model, spec, windows, progress)
    return {"spec": spec.to_dict(), **stats}
