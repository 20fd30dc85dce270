"""Frozen engine configuration: what the model is, how the KV cache and the scheduler are sized.

`EngineArgs` (engine_args.py) is the flat user-facing form; it resolves into an `EngineConfig` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# Per-layer attention kinds. A layer with a window keeps only the last `window` tokens' KV.
FULL_ATTENTION = 0

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")  # what models/rope.py computes


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are scaled: HF `rope_parameters` / `rope_scaling`, or GGUF `rope.scaling.*` and
    rope factor tensors. models/rope.py turns it into inverse frequencies and an attention factor."""

    rope_type: str = "default"  # default | linear | dynamic | yarn | llama3 | longrope
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    mscale: float = 0.0  # yarn (DeepSeek form): attention factor from mscale / mscale_all_dim
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # yarn, longrope; None: derived from factor
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors up to the original context
    long_factor: tuple[float, ...] = ()  # longrope: beyond it
    freq_factors: tuple[float, ...] = ()  # per-frequency divisors given outright (GGUF rope_freqs.weight)

    def to_dict(self) -> dict:
        """The HF `rope_parameters` form, read back by weights/hf_arch.py (freq_factors is our own key)."""
        if self.rope_type == "default":
            return {"rope_type": "default"}
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if v is not None and v != ()}


@dataclass(frozen=True)
class ArchConfig:
    """Architecture hyper-parameters read from a checkpoint (GGUF metadata or config.json)."""

    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3" | "gemma2" | "gemma3" | "phi3"
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
    rope_scaling: RopeScaling = RopeScaling()  # of the full-attention layers (gemma3's sliding ones: none)
    qk_norm: bool = False  # per-head RMS norm of q and k before rope (qwen3; gemma3 always has it)
    attention_out_bias: bool = False  # o_proj has a bias (llama / qwen3 `attention_bias` covers q, k, v and o)
    # the longest sequence served (0: max_position_embeddings); longrope picks its factors by it
    served_len: int = 0
    rotary_dim: int = 0  # leading dims of each head that rotate (0: all; phi3's partial_rotary_factor)
    attn_logit_softcapping: float = 0.0  # scores -> cap * tanh(scores / cap) before softmax (0: off; gemma2)
    final_logit_softcapping: float = 0.0  # the same on the output logits (gemma2)
    # mixture of experts (mixtral, qwen2_moe; models/moe.py): 0 experts = a dense MLP
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # qwen2_moe: an always-on expert, gated by sigmoid(w . x)

    def for_context(self, max_len: int) -> ArchConfig:
        """This architecture as served up to max_len tokens (only longrope depends on it)."""
        if self.rope_scaling.rope_type != "longrope" or max_len == self.served_len:
            return self
        return replace(self, served_len=max_len)

    def tensor_parallel_problem(self, world: int) -> str | None:
        """Why this architecture cannot be split over `world` ranks (None: it can; parallel/shard.py)."""
        h, hkv = self.num_heads, self.num_kv_heads
        if h % world:
            return f"num_heads ({h}) is not divisible by tensor_parallel_size ({world})"
        if hkv % world and world % hkv:
            return f"num_kv_heads ({hkv}) and tensor_parallel_size ({world}) must divide one another"
        for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(self, key) % world:
                return f"{key} ({getattr(self, key)}) is not divisible by tensor_parallel_size ({world})"
        return None

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
    prompt_attention: str = "auto"  # auto | bf16 | fp32: what prompt chunks' SDPA rounds q, K and V to


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


TP_ALL_REDUCE = ("auto", "shm", "torch")  # tensor parallel's all-reduce: auto, the CPU buffer, torch.distributed


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs, resolved and validated."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    spec: SpecConfig | None = None
    overflow_policy: str = "error"
    tensor_parallel_size: int = 1
    tensor_parallel_all_reduce: str = "auto"  # one of TP_ALL_REDUCE (parallel/group.py)
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
