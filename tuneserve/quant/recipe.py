"""What to quantize and how: QuantRecipe, the `quantization=` names, and group-size checks."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from math import gcd

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
    """QuantRecipe for a quantization= name, with TUNESERVE_QUANT_* environment overrides, then kwargs.

    Environment (for engines built from flags): TUNESERVE_QUANT_GROUP_SIZE, _SAMPLES, _SEQ_LEN, _CORPUS,
    _SEED, _ACT_ORDER (0/1), _SYMMETRIC (0/1), _AWQ_BLOCK_LOSS (0/1), _AWQ_ROUNDING (rtn/gptq).
    """
    if name not in METHODS:
        raise ValueError(f"unknown quantization {name!r}; one of {sorted(METHODS)}, 'gguf' or a checkpoint "
                         "directory")
    method, bits = METHODS[name]
    spec = QuantRecipe(method=method, bits=bits)
    def flag(v: str) -> bool:
        return v not in ("0", "false", "")

    env = {"group_size": int, "samples": int, "seq_len": int, "corpus": str, "seed": int, "act_order": flag,
           "symmetric": flag, "awq_block_loss": flag, "awq_rounding": str}
    for key, conv in env.items():
        v = os.environ.get(f"TUNESERVE_QUANT_{key.upper()}")
        if v is not None:
            spec = replace(spec, **{key: conv(v)})
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if spec.awq_rounding not in AWQ_ROUNDINGS:
        raise ValueError(f"awq_rounding {spec.awq_rounding!r}: use {' or '.join(map(repr, AWQ_ROUNDINGS))}")
    return spec


def fitting_group_sizes(sizes: list[int], bits: int) -> list[int]:
    """Group sizes that divide every input size (multiples of 32 for int4's block layout), up to 256."""
    g = 0
    for k in sizes:
        g = gcd(g, k)
    step = 32 if bits == 4 else 16
    return [d for d in range(step, min(g, 256) + 1, step) if g % d == 0]
