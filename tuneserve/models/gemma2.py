"""Gemma 2: Gemma 3's layer (four norms, sqrt(hidden)-scaled embeddings, GELU-tanh MLP, attention scale
1/sqrt(query_pre_attn_scalar)) without the q/k norms, every other layer sliding (layer 0 first), one rope
base for all, and soft-capping: attention scores -> cap * tanh(scores / cap) before softmax
(ArchConfig.attn_logit_softcapping, computed on the portable attention path; kernels/attention.py) and the
same on the output logits (final_logit_softcapping, in LlamaForCausalLM.compute_logits).
Norm weights include Gemma's "+1" as for Gemma 3 (weights/safetensors.py adds it to HF checkpoints').
"""

from __future__ import annotations

from tuneserve.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM


class Gemma2DecoderLayer(Gemma3DecoderLayer):
    qk_norm = False


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    layer_cls = Gemma2DecoderLayer
