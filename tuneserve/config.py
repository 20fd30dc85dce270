"""Frozen engine configuration: what the model is, how the KV cache and the scheduler are sized.

`EngineArgs` (engine_args.py) is the flat user-facing form; it resolves into an `EngineConfig` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Per-layer attention kinds. A layer with a window keeps only the last `window` tokens' KV.
FULL_ATTENTION = 0


@dataclass(frozen=True)
class ArchConfig:
    """Architecture hyper-parameters read from a checkpoint (GGUF metadata or config.json)."""

    architecture: str  # "llama" | "qwen2" | "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # Per-layer sliding window (0 = full attention); empty means every layer is full attention.
    layer_windows: tuple[int, ...] = ()
    rope_theta_local: float = 0.0  # rope base of sliding layers where it differs (gemma3)
    hidden_act: str = "silu"
    query_pre_attn_scalar: float = 0.0  # attention scale = 1/sqrt(this) where set (gemma3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def window_of(self, layer: int) -> int:
        """Sliding window of a layer, 0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to run and how: the resolved model source plus numeric choices."""

    model: str  # what the user asked for (alias, path, hub id)
    path: str  # resolved local file or directory
    arch: ArchConfig
    dtype: str = "float32"
    max_model_len: int = 2048
    quantization: str | None = None
    seed: int = 0
    tokenizer: str | None = None  # a directory holding tokenizer files; None: from the model source
    kernels: str = "auto"  # auto | portable: resolved with quant_activations by kernels/config.py at load
    quant_activations: str = "auto"  # auto | int8 | int8-all | bf16 | fp32


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing."""

    block_size: int = 16
    num_blocks: int = 0  # resolved from kv_cache_memory_bytes at engine start
    kv_cache_memory_bytes: int = 0
    enable_prefix_caching: bool = True
    sliding_window: int = 0  # a window imposed on a model trained without one (0 = none)
    num_sink_tokens: int = 4  # tokens kept at the start when `sliding_window` is imposed


@dataclass(frozen=True)
class SchedulerConfig:
    """Token-budget continuous batching limits."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" | "priority" (lower value runs first)


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding: how drafts are proposed and how many per step."""

    method: str  # "ngram" | "draft"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2  # a 1-token match mostly proposes noise
    prompt_lookup_max: int = 4
    model: str | None = None  # draft: the draft model (default with `quantization`: the target itself)
    quantization: str | None = None  # draft: quantize the draft model, e.g. "int4" for a cheap self-draft
    adaptive: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs, resolved and validated."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    spec: SpecConfig | None = None
    overflow_policy: str = "error"
    tensor_parallel_size: int = 1
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
