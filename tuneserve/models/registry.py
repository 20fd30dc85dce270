"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from tuneserve.config import ArchConfig
from tuneserve.models.gemma2 import Gemma2ForCausalLM
from tuneserve.models.gemma3 import Gemma3ForCausalLM
from tuneserve.models.llama import LlamaForCausalLM
from tuneserve.models.moe import MoEForCausalLM
from tuneserve.models.phi3 import Phi3ForCausalLM

_MODELS: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,  # llama with a sliding window on every layer (ArchConfig.layer_windows)
    "qwen2": LlamaForCausalLM,  # llama with q/k/v biases (ArchConfig.attention_bias) and an untied head
    "qwen3": LlamaForCausalLM,  # llama with per-head q/k RMS norm (ArchConfig.qk_norm)
    "gemma2": Gemma2ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "phi3": Phi3ForCausalLM,  # llama with fused checkpoint tensors (longrope, partial rotary in ArchConfig)
    "mixtral": MoEForCausalLM,  # mistral's attention, top-2 of 8 experts
    "qwen2_moe": MoEForCausalLM,  # qwen2's attention, top-k experts and a gated shared expert
}


def model_class(arch: ArchConfig) -> type[nn.Module]:
    """The class that implements arch.architecture."""
    cls = _MODELS.get(arch.architecture)
    if cls is None:
        raise ValueError(f"architecture {arch.architecture!r} is not supported; supported: {sorted(_MODELS)}")
    return cls
