"""EngineArgs: the engine's knobs under one set of names, for Python, CLI flags and config files.

`LLM(model=..., max_num_seqs=...)`, `tuneserve serve --max-num-seqs ...` and a JSON/TOML config file
with `max_num_seqs = ...` all land here; `create_engine_config()` resolves defaults and validates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tuneserve.config import (
    TP_ALL_REDUCE,
    ArchConfig,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    SpecConfig,
)
from tuneserve.kernels.config import KERNELS, PROMPT_ATTENTION, QUANT_ACTS, check_choice
from tuneserve.log import log
from tuneserve.quant.recipe import METHODS, parse_quantization
from tuneserve.weights import open_checkpoint
from tuneserve.weights.sources import DEFAULT_MODEL, resolve

OVERFLOW_POLICIES = ("error", "truncate-left", "truncate-middle", "summarize")
QUANTIZATIONS = ("int8", "int4", "gptq-int4", "gptq-int8", "awq-int4", "gguf")
KV_MEMORY_FRACTION = 0.15  # default KV cache: this fraction of available memory ...
KV_MEMORY_CAP = 2 << 30  # ... and at most this much (zeroing it costs ~0.6 s per GiB here)


@dataclass
class EngineArgs:
    """Every engine argument (see DESIGN.md for their meaning); None means: pick the default."""

    model: str = DEFAULT_MODEL
    tokenizer: str | None = None
    dtype: str = "float32"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    quantization: str | None = "auto"  # auto: a GGUF file's own blocks, an HF directory's dtype; none: dtype
    speculative_config: dict | str | None = None
    sliding_window: int | None = None
    overflow_policy: str = "error"
    seed: int = 0
    tensor_parallel_size: int = 1
    tensor_parallel_all_reduce: str = "auto"  # auto: NCCL on CUDA, a shared buffer on CPU; torch: gloo on CPU
    scheduling_policy: str = "fcfs"
    device: str = "auto"
    kernels: str = "auto"  # auto | unfused (compiled kernels op by op) | portable (PyTorch path); kernels/config.py
    quant_activations: str = "auto"  # quantized matmuls' activations: auto | int8 | int8-all | bf16 | fp32
    prompt_attention: str = "auto"  # prompt chunks' attention: auto (bf16 after bf16 tiles) | bf16 | fp32

    # ----- resolution -----------------------------------------------------------------------
    def create_engine_config(self) -> EngineConfig:
        """Resolve the model source and every default; raise ValueError on an invalid value."""
        self._validate()
        path = resolve(self.model)
        arch = open_checkpoint(path).arch_config()
        max_len = self.max_model_len or arch.max_position_embeddings
        if max_len > arch.max_position_embeddings:
            raise ValueError(f"max_model_len ({max_len}) exceeds the model's context "
                             f"({arch.max_position_embeddings}); lower it")
        arch = arch.for_context(max_len)  # longrope picks its factors by the served length
        device = self.device if self.device != "auto" else default_device()
        self._check_tensor_parallel(arch, device)
        model = ModelConfig(model=self.model, path=str(path), arch=arch, dtype=self.dtype, max_model_len=max_len,
                            quantization=auto_quantization(self.quantization, path), seed=self.seed,
                            tokenizer=self.tokenizer,
                            kernels=self.kernels, quant_activations=self.quant_activations,
                            prompt_attention=self.prompt_attention)
        budget = self.max_num_batched_tokens or (512 if self.enable_chunked_prefill else max(max_len, 2048))
        sched = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=budget,
                                max_model_len=max_len, enable_chunked_prefill=self.enable_chunked_prefill,
                                policy=self.scheduling_policy)
        cache = CacheConfig(block_size=self.block_size, enable_prefix_caching=self.enable_prefix_caching,
                            kv_cache_memory_bytes=self.kv_cache_memory_bytes or default_kv_memory(device),
                            sliding_window=self.sliding_window or 0)
        return EngineConfig(model=model, cache=cache, scheduler=sched, spec=self._spec_config(),
                            overflow_policy=self.overflow_policy, tensor_parallel_size=self.tensor_parallel_size,
                            tensor_parallel_all_reduce=self.tensor_parallel_all_reduce, device=device)

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        need(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), f"block_size must be a power of two in [1, 128], "
             f"got {self.block_size}")
        need(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        need(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        need(self.max_model_len is None or self.max_model_len >= 2, f"max_model_len must be >= 2, got "
             f"{self.max_model_len}")
        need(self.overflow_policy in OVERFLOW_POLICIES,
             f"overflow_policy must be one of {OVERFLOW_POLICIES}, got {self.overflow_policy!r}")
        need(self.scheduling_policy in ("fcfs", "priority"),
             f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        need(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        check_choice("tensor_parallel_all_reduce", self.tensor_parallel_all_reduce, TP_ALL_REDUCE)
        need(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
             f"kv_cache_memory_bytes must be positive, got {self.kv_cache_memory_bytes}")
        need(self.sliding_window is None or self.sliding_window >= 1,
             f"sliding_window must be a positive number of tokens, got {self.sliding_window}")
        check_choice("kernels", self.kernels, KERNELS)
        check_choice("quant_activations", self.quant_activations, QUANT_ACTS)
        check_choice("prompt_attention", self.prompt_attention, PROMPT_ATTENTION)
        q = self.quantization
        need(q is None or q in ("auto", "none", *QUANTIZATIONS) or Path(q).exists() or q.split(":")[0] in METHODS,
             f"quantization must be one of {QUANTIZATIONS} (recipe options after colons, e.g. 'int4:g64') "
             f"or a quantized checkpoint directory, got {q!r}")
        if q is not None and ":" in q and not Path(q).exists():
            parse_quantization(q)  # a bad recipe option fails here, not after the weights are loaded
        if q == "none":
            self.quantization = None

    def _check_tensor_parallel(self, arch: ArchConfig, device: str) -> None:
        n = self.tensor_parallel_size
        if n == 1:
            return
        problem = arch.tensor_parallel_problem(n)
        if problem is not None:
            raise ValueError(f"tensor_parallel_size {n}: {problem}; choose a divisor of both head counts")
        if device.startswith("cuda") and self.tensor_parallel_all_reduce == "shm":
            raise ValueError("tensor_parallel_all_reduce 'shm' is the CPU's shared buffer; on CUDA use auto (NCCL)")
        import torch

        devices = torch.cuda.device_count() if device.startswith("cuda") else len(os.sched_getaffinity(0))
        if n > devices:
            kind = "GPUs" if device.startswith("cuda") else "CPUs"
            raise ValueError(f"tensor_parallel_size {n} exceeds the {devices} {kind} this process may use")

    def _spec_config(self) -> SpecConfig | None:
        sc = self.speculative_config
        if sc is None or sc == "off":
            return None
        if isinstance(sc, str):
            sc = json.loads(sc)
        allowed = {f.name for f in fields(SpecConfig)}
        unknown = set(sc) - allowed
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        if sc.get("method") not in ("ngram", "draft"):
            raise ValueError(f"speculative_config.method must be 'ngram' or 'draft', got {sc.get('method')!r}")
        spec = SpecConfig(**sc)
        if not 1 <= spec.num_speculative_tokens <= 15:
            raise ValueError(f"num_speculative_tokens must be in [1, 15], got {spec.num_speculative_tokens}")
        return spec

    # ----- CLI and config files -------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, with_model: bool = True) -> None:
        """Add every engine argument as a --kebab-case flag (and --config FILE)."""
        parser.add_argument("--config", help="JSON or TOML file of engine arguments (flags override it)")
        for f in fields(EngineArgs):
            if f.name == "model" and not with_model:
                continue
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool",):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
            else:
                conv = int if "int" in str(f.type) else str
                parser.add_argument(flag, type=conv, default=None, metavar=f.name.upper())

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        """EngineArgs from parsed flags, over a --config file, over the defaults."""
        values: dict[str, Any] = load_config_file(ns.config) if getattr(ns, "config", None) else {}
        for f in fields(cls):
            v = getattr(ns, f.name, None)
            if v is not None:
                values[f.name] = v
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EngineArgs:
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown engine arguments {sorted(unknown)}; known: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str) -> dict[str, Any]:
    """Engine arguments from a .json or .toml file (keys with _ or -)."""
    p = Path(path)
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(p.read_text())
    else:
        data = json.loads(p.read_text())
    return {k.replace("-", "_"): v for k, v in data.items()}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a conservative 4 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def default_kv_memory(device: str) -> int:
    """KV cache bytes when the user gives none: 15% of available RAM (at most 2 GiB) on the CPU, 40% of
    free device memory on a GPU."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.4)
    return min(int(available_memory_bytes() * KV_MEMORY_FRACTION), KV_MEMORY_CAP)


def auto_quantization(quantization: str | None, path: Path) -> str | None:
    """What "auto" serves: a GGUF file's own blocks through the native kernels (tensors without one are
    dequantized, quant/gguf_native.py), anything else in its dtype. Other values pass through."""
    if quantization != "auto":
        return quantization
    if Path(path).is_file() and Path(path).suffix == ".gguf":
        log("quantization auto: gguf, the file's own blocks (--quantization none serves it dequantized)")
        return "gguf"
    return None
