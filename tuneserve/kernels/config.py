"""KernelConfig: which compute kernels a model runs, decided once when it is loaded.

The choice follows from what the engine arguments ask for (`kernels`, `quant_activations`), what this CPU
offers (AVX2, AVX-512, AVX-512 VNNI, native bf16) and which compiled kernels (kernels/csrc) built here.
`resolve` makes it; where a choice is "auto" it falls back to the environment, read here and nowhere
else: `TUNESERVE_KERNELS=portable` (every layer on the PyTorch path; `unfused`: the compiled kernels, called
op by op, never the fused decode step), `TUNESERVE_QUANT_ACT` (int8 | int8-all | bf16 | fp32) and
`TUNESERVE_TILE_GEMM` (amx | torch: who multiplies the bf16 tiles). `bind_kernels` hands the result to
every module that has a `bind_kernels(config)` method (dense and quantized linears, attention), so a
forward pass never re-decides it; only checks on its inputs (row count, dtype) remain per call.

Quantized-matmul activation modes (`quant_act`, what the kernels round x to):
  int8      below quant_ops.VNNI_MAX_M rows, int8 per 32 inputs (llama.cpp's scheme: integer dot products
            with AVX-512 VNNI, or AVX2's vpmaddubsw); larger batches as bf16
  int8-all  int8 at every batch size (to measure decode numerics on long evaluation windows)
  bf16      small batches in fp32; larger batches multiply bf16 tiles (native bf16 CPUs: ~3x an fp32 GEMM)
  fp32      fp32 everywhere
A mode the machine cannot run falls back to the next one down (int8 -> bf16 -> fp32), so `quant_act`
always says what runs.

The bf16 tiles' GEMM (`tile_gemm`): "amx" on CPUs with AMX where csrc/amx_matmul.c builds and the kernel
grants the tile state (it dequantizes each panel of weights into the AMX operand layout and multiplies
there, no dequantized matrix and no library reorder), else "torch" (dequantized tiles, torch's GEMM).

Prompt attention (`prompt_attention`, what a prompt chunk's SDPA rounds q, K and V to; the KV cache keeps
its dtype): bf16 | fp32, or auto: bf16 in a layer whose q|k|v projection has no bias and multiplied bf16
tiles for this step, else fp32 (Attention.prompt_bf16 in models/layers.py has the measurements).
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuneserve.kernels import libraries

if TYPE_CHECKING:  # engine_args imports this module: keep torch out of CLI start-up
    from torch import nn

KERNELS = ("auto", "unfused", "portable")
QUANT_ACTS = ("auto", "int8", "int8-all", "bf16", "fp32")
PROMPT_ATTENTION = ("auto", "bf16", "fp32")
TILE_GEMMS = ("auto", "amx", "torch")
ENV_KERNELS, ENV_QUANT_ACT, ENV_TILE_GEMM = "TUNESERVE_KERNELS", "TUNESERVE_QUANT_ACT", "TUNESERVE_TILE_GEMM"


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set extensions of this CPU that change which kernel is fastest."""

    avx2: bool = False
    avx512: bool = False  # AVX-512 F: the compiled kernels' widest vector code
    avx512_vnni: bool = False  # int8 dot products: the int8-activation matmul kernels' fastest form
    avx512_bf16: bool = False
    amx_bf16: bool = False

    @staticmethod
    @functools.cache
    def detect() -> CpuFeatures:
        """This CPU's features, from /proc/cpuinfo (none where it cannot be read)."""
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((line for line in f if line.startswith("flags")), "").split())
        except OSError:
            flags = set()
        return CpuFeatures(avx2="avx2" in flags, avx512="avx512f" in flags, avx512_vnni="avx512_vnni" in flags,
                           avx512_bf16="avx512_bf16" in flags, amx_bf16="amx_bf16" in flags)

    @property
    def native_bf16(self) -> bool:
        """Whether bf16 GEMMs run natively (AVX512-BF16 or AMX), not emulated."""
        return self.avx512_bf16 or self.amx_bf16

    @property
    def isa(self) -> str:
        """The vector extension the compiled kernels use here (they are built with -march=native)."""
        return "avx512" if self.avx512 else "avx2" if self.avx2 else platform.machine() or "scalar"

    def describe(self) -> str:
        """The features that matter here, e.g. 'avx2' or 'avx512+vnni+amx-bf16'."""
        extra = [n for n, on in (("vnni", self.avx512_vnni), ("avx512-bf16", self.avx512_bf16),
                                 ("amx-bf16", self.amx_bf16)) if on]
        return "+".join([self.isa, *extra])


@functools.cache
def cpu_name() -> str:
    """This CPU's model name, as /proc/cpuinfo gives it (else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


@dataclass(frozen=True)
class KernelConfig:
    """The kernels a loaded model runs; the defaults are the portable PyTorch path everywhere."""

    dense: str = "torch"  # fp32 linears below dense_ops.SMALL_M rows: "compiled" | "torch"
    quant: str = "portable"  # quantized matmuls: "compiled" (csrc/qmatmul*.c) | "portable" (PyTorch tiles)
    quant_act: str = "fp32"  # activation mode of quantized matmuls (module docstring): int8 | int8-all | bf16 | fp32
    attention: str = "torch"  # short queries (decodes): "compiled" (csrc/paged_attention.c) | "torch"
    decode: str = "layers"  # decode steps of llama-family models: "fused" (csrc/decode_step.c) | "layers"
    prompt_attention: str = "auto"  # prompt chunks' SDPA: "auto" | "bf16" | "fp32" (module docstring)
    tile_gemm: str = "torch"  # the bf16 tiles' GEMM: "amx" (csrc/amx_matmul.c) | "torch"
    features: CpuFeatures = field(default_factory=CpuFeatures)

    @property
    def bf16_tiles(self) -> bool:
        """Whether large quantized batches multiply bf16 tiles."""
        return self.quant == "compiled" and self.quant_act != "fp32" and self.features.native_bf16

    def label(self, choice: str) -> str:
        """A kernel choice as the startup line names it: 'compiled(avx2)', else the choice itself."""
        return f"compiled({self.features.isa})" if choice == "compiled" else choice

    def describe(self, attention: str | None = None, decode: str | None = None, prompt: str | None = None) -> str:
        """One line for the startup log, e.g. 'dense=compiled(avx2) ... quant-act=int8(vnni) ... cpu=avx512+vnni'.
        attention: what the bound attention layers run, where that is not simply this config's choice (a
        soft-capped layer never takes the compiled kernel: loading.attention_paths says so); decode: the
        same for the fused decode step ('layers(soft-capping)' where the model's layers refuse it); prompt: the
        same for prompt attention (what "auto" came to)."""
        bf16 = "amx" if self.features.amx_bf16 else "avx512-bf16"
        dot = "vnni" if self.features.avx512_vnni else self.features.isa  # the int8 kernels' dot product
        act = {"int8": f"int8({dot})", "int8-all": f"int8-all({dot})", "bf16": f"bf16({bf16})", "fp32": "fp32"}
        tiles = f"+bf16-tiles({bf16})" if self.bf16_tiles and self.quant_act.startswith("int8") else ""
        tiles += " tile-gemm=amx" if self.bf16_tiles and self.tile_gemm == "amx" else ""
        return (f"dense={self.label(self.dense)} quant={self.label(self.quant)} quant-act={act[self.quant_act]}"
                f"{tiles} attention={attention or self.label(self.attention)} decode={decode or self.decode} "
                f"prompt-attention={prompt or self.prompt_attention} cpu={self.features.describe()}")


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    """value if it is one of allowed, else a ValueError naming the setting and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def resolve(kernels: str = "auto", quant_activations: str = "auto", prompt_attention: str = "auto",
            env: Mapping[str, str] | None = None) -> KernelConfig:
    """The KernelConfig for explicit choices; an "auto" choice of kernels or activations falls back to the
    environment (env, default os.environ: TUNESERVE_KERNELS, TUNESERVE_QUANT_ACT, TUNESERVE_TILE_GEMM), then
    to the fastest this machine runs; prompt_attention "auto" is decided per layer (module docstring)."""
    env = os.environ if env is None else env
    check_choice("kernels", kernels, KERNELS)
    check_choice("quant_activations", quant_activations, QUANT_ACTS)
    check_choice("prompt_attention", prompt_attention, PROMPT_ATTENTION)
    if kernels == "auto":
        kernels = check_choice(ENV_KERNELS, env.get(ENV_KERNELS, "auto"), KERNELS)
    if quant_activations == "auto":
        quant_activations = check_choice(ENV_QUANT_ACT, env.get(ENV_QUANT_ACT, "auto"), QUANT_ACTS)
    tile_gemm = check_choice(ENV_TILE_GEMM, env.get(ENV_TILE_GEMM, "auto"), TILE_GEMMS)
    features = CpuFeatures.detect()
    if kernels == "portable":
        return KernelConfig(prompt_attention=prompt_attention, features=features)
    quant = "compiled" if libraries.qmatmul() is not None else "portable"
    attention = "compiled" if libraries.paged_attention() is not None else "torch"
    fused = kernels == "auto" and attention == "compiled" and libraries.decode_step() is not None
    return KernelConfig(dense="compiled" if libraries.dense() is not None else "torch", quant=quant,
                        quant_act=_runnable_act(quant_activations, quant, features), attention=attention,
                        decode="fused" if fused else "layers", prompt_attention=prompt_attention,
                        tile_gemm=_runnable_tile_gemm(tile_gemm, quant, features), features=features)


def _runnable_tile_gemm(asked: str, quant: str, features: CpuFeatures) -> str:
    """"amx" where asked for or "auto" and this machine runs csrc/amx_matmul.c (AMX, the kernel built, the
    tile state granted), else "torch"."""
    runs = quant == "compiled" and features.amx_bf16 and libraries.amx_matmul() is not None
    return "amx" if asked != "torch" and runs else "torch"


def _runnable_act(asked: str, quant: str, features: CpuFeatures) -> str:
    """The activation mode asked for, or the next one down that this machine runs. "auto" takes int8 only
    with AVX-512 VNNI: on AVX2 the int8 kernels decode SmolLM2 at batch 1 ~1.2x faster but agree with fp32
    on the top token at 97.5% of positions (`tuneserve eval --quant-activations int8-all`), below the 99%
    the default keeps; there they are asked for by name."""
    act = ("int8" if features.avx512_vnni else "bf16") if asked == "auto" else asked
    if quant != "compiled":
        return "fp32"  # the portable path computes in fp32
    if act.startswith("int8") and not libraries.qmatmul_vnni() is not None:
        act = "bf16"
    if act == "bf16" and not features.native_bf16:
        act = "fp32"
    return act


@functools.cache
def detected() -> KernelConfig:
    """The fastest configuration this machine runs, ignoring the environment: what modules that were
    never bound (built outside `loading.load_model`) and kernel calls given no config use."""
    return resolve(env={})


def bind_kernels(model: nn.Module, config: KernelConfig) -> None:
    """Give config to model and every submodule with a `bind_kernels(config)` method."""
    for m in model.modules():
        bind = getattr(m, "bind_kernels", None)
        if callable(bind):
            bind(config)
    model.kernels = config  # the model's own record of what it runs
