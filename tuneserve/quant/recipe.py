"""What to quantize and how: QuantRecipe, the `quantization=` strings (name[:options]), group-size checks."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from math import gcd

from tuneserve.log import log

METHODS = {  # quantization= name -> (method, bits)
    "int8": ("rtn", 8),
    "int4": ("rtn", 4),
    "gptq-int4": ("gptq", 4),
    "gptq-int8": ("gptq", 8),
    "awq-int4": ("awq", 4),
}
GROUP_SIZES = (32, 64, 128)
AWQ_ROUNDINGS = ("rtn", "gptq")  # how AWQ rounds its scaled weights: to nearest, or by GPTQ


@dataclass
class QuantRecipe:
    """A quantization recipe. group_size None: per output channel for int8; for int4 the largest of
    128 / 64 / 32 that divides every layer's input size."""

    method: str = "rtn"  # rtn | gptq | awq
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False  # int4 only; int8 is always symmetric
    embeddings: bool = True  # also quantize the token embedding and an untied LM head
    # calibration (GPTQ, AWQ)
    # prose and code: calibrating on wikipedia alone left GPTQ at 5-47% recovery on python-docs (Qwen2.5-Coder-0.5B,
    # SmolLM2); with half of the samples from each, 47-69% there and as good or better on wikipedia
    corpus: str = "wikipedia+python-docs"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    # GPTQ
    damp: float = 0.01
    act_order: bool = True
    clip_search: bool = True  # MSE search of each group's range (GPTQ and AWQ)
    true_sequential: bool = True  # within a layer, later projections see the quantized earlier ones
    # AWQ
    awq_grid: int = 20
    awq_block_loss: bool = True  # choose q|k|v's scales on the attention output (False: on q|k|v's own output)
    awq_rounding: str = "gptq"  # gptq: AWQ's scales where they help, GPTQ's rounding | rtn: AWQ as published

    def to_dict(self) -> dict:
        """JSON-able form (written into checkpoints)."""
        return asdict(self)


def parse_quantization(name: str, **overrides: object) -> QuantRecipe:
    """QuantRecipe for a quantization= string, then kwargs that are not None (CLI flags).

    The string is a method name with optional recipe options after colons: `awq-int4`, `int4:g64`,
    `gptq-int4:g128:samples=64:corpus=wikipedia:act_order=0` (gN is group_size=N; options are QuantRecipe
    fields, see RECIPE_OPTIONS). The environment is not read: TUNESERVE_QUANT_* variables that once
    overrode recipes are reported as ignored.
    """
    base, *opts = name.split(":")
    if base not in METHODS:
        raise ValueError(f"unknown quantization {base!r}; one of {sorted(METHODS)}, 'gguf' or a checkpoint "
                         "directory (recipe options after colons, e.g. 'int4:g64')")
    method, bits = METHODS[base]
    spec = replace(QuantRecipe(method=method, bits=bits), **parse_options(opts))
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if spec.awq_rounding not in AWQ_ROUNDINGS:
        raise ValueError(f"awq_rounding {spec.awq_rounding!r}: use {' or '.join(map(repr, AWQ_ROUNDINGS))}")
    _report_retired_env()
    return spec


RECIPE_OPTIONS = {f.name: f.type for f in fields(QuantRecipe) if f.name not in ("method", "bits")}


def parse_options(opts: list[str]) -> dict[str, object]:
    """['g64', 'samples=32', 'act_order=0'] -> {'group_size': 64, 'samples': 32, 'act_order': False}."""
    out: dict[str, object] = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq and key[:1] == "g" and key[1:].isdigit():
            key, value = "group_size", key[1:]
        elif not eq or key not in RECIPE_OPTIONS:
            raise ValueError(f"quantization option {opt!r}: use gN or key=value with key one of "
                             f"{sorted(RECIPE_OPTIONS)}")
        out[key] = _convert(key, value)
    return out


def _convert(key: str, value: str) -> object:
    kind = RECIPE_OPTIONS[key]
    try:
        if "bool" in kind:
            return value.lower() not in ("0", "false", "no", "off", "")
        if "int" in kind:
            return int(value)
        return float(value) if "float" in kind else value
    except ValueError:
        raise ValueError(f"quantization option {key}={value!r}: not a valid {kind}") from None


def _report_retired_env() -> None:
    """Log TUNESERVE_QUANT_* recipe variables that are set: they no longer change a recipe, and a user who
    set one must not be left believing it did."""
    stale = sorted(k for k in os.environ if k.startswith("TUNESERVE_QUANT_") and k != "TUNESERVE_QUANT_ACT")
    if stale:
        log(f"ignoring {', '.join(stale)}: recipe options come from the quantization string "
            "(e.g. 'gptq-int4:g64:samples=64') or `tuneserve quantize` flags, not the environment")


def fitting_group_sizes(sizes: list[int], bits: int) -> list[int]:
    """Group sizes that divide every input size (multiples of 32 for int4's block layout), up to 256."""
    g = 0
    for k in sizes:
        g = gcd(g, k)
    step = 32 if bits == 4 else 16
    return [d for d in range(step, min(g, 256) + 1, step) if g % d == 0]
