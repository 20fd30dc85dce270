"""Reading GGUF checkpoints: architecture metadata and tensors under HF-style names.

Traps handled here (shared/MODELS.md): GGUF lists shapes (in, out), torch wants (out, in); llama-arch
files store attn_q / attn_k rows permuted for interleaved rope, which we undo so every model uses
rotate-half rope; gemma norm weights already include the +1; phi3 fuses q/k/v (`attn_qkv`) and gate/up
(`ffn_up`, gate rows first), named here as HF's phi3 names them (models/phi3.py splits them).
What the metadata means: gguf_arch.py.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tuneserve.config import ArchConfig
from tuneserve.weights.gguf_arch import ROPE_TENSORS, arch_from_gguf

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    # mixture of experts: the router, the experts stacked (E, out, in; tensors() yields them one by one), and
    # Qwen2-MoE's shared expert with its gate
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp permutes q / k rows (weights and biases) of llama-arch files for its interleaved rope
_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str, arch: str) -> str:
    """HF-style parameter name for a GGUF tensor name."""
    m = _BLK.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        if part == "ffn_norm":  # llama: the norm before the MLP; gemma has a separate post-attn norm
            mapped = "pre_feedforward_layernorm" if arch in ("gemma2", "gemma3") else "post_attention_layernorm"
        elif part == "ffn_up" and arch == "phi3":
            mapped = "mlp.gate_up_proj"
        else:
            mapped = _LAYER_NAMES.get(part, part)
        return f"model.layers.{layer}.{mapped}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES.get(base, base)}.{kind}"


def expert_name(stacked: str, e: int) -> str:
    """The HF-style name of expert e's slice of a stacked expert tensor (mlp.experts.X -> mlp.experts.e.X)."""
    return stacked.replace(".mlp.experts.", f".mlp.experts.{e}.")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows (half, 2) -> (2, half)."""
    out_dim = w.shape[0]
    half = out_dim // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@functools.lru_cache(maxsize=1)
def _reader(path: str, mtime_ns: int):  # noqa: ANN202 - gguf.GGUFReader
    """The file's reader, kept for the next opening: parsing a 150k-token vocabulary's metadata takes ~20 s,
    and loading opens the file several times (config, weights, native blocks). Tensor data is memory-mapped."""
    from gguf import GGUFReader

    return GGUFReader(path)


class GGUFCheckpoint:
    """One GGUF file: its metadata, architecture, tokenizer fields and tensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = _reader(str(self.path), self.path.stat().st_mtime_ns)
        self.meta = {k: self._value(f) for k, f in self.reader.fields.items()
                     if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
        self.architecture = str(self.meta["general.architecture"])
        self.tensor_names = [t.name for t in self.reader.tensors]
        self._arch: ArchConfig | None = None

    @staticmethod
    def _value(field):  # noqa: ANN001, ANN205 - gguf's own field type
        try:
            return field.contents()
        except Exception:  # noqa: BLE001 - some array fields cannot be decoded; we never need them
            return None

    def arch_config(self) -> ArchConfig:
        """Architecture hyper-parameters from the metadata (weights/gguf_arch.py), computed once."""
        if self._arch is None:
            self._arch = arch_from_gguf(self.meta, set(self.tensor_names), self._small_tensor, self._vocab_size,
                                        self.path.name)
        return self._arch

    def _small_tensor(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = next(t for t in self.reader.tensors if t.name == name)
        return dequantize(t.data, t.tensor_type).astype(np.float32)

    def _vocab_size(self) -> int:
        return len(self.reader.fields["tokenizer.ggml.tokens"].data)

    def tensors(self, progress: bool = True, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, np.ndarray]]:
        """(HF-style name, float32 array in torch layout) for every tensor, dequantized; tensors whose name
        (without "model.") is in `skip` are neither read nor yielded (they are served from their blocks)."""
        from gguf.quants import dequantize

        arch = self.arch_config()
        for t in tqdm(self.reader.tensors, desc=f"loading {self.path.name}", unit="tensor",
                      disable=not progress, leave=False):
            if t.name in ROPE_TENSORS:  # read into arch.rope_scaling, not weights
                continue
            name = hf_name(t.name, self.architecture)
            if t.name.endswith("_exps.weight"):  # one tensor per expert, each read only if wanted
                for e in range(int(t.shape[2])):
                    one = expert_name(name, e)
                    if one.removeprefix("model.") not in skip:
                        yield one, dequantize(t.data[e], t.tensor_type).astype(np.float32, copy=False)
                continue
            if name.removeprefix("model.") in skip:
                continue
            w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
            if self.architecture in ("llama", "mistral") and t.name.endswith(_PERMUTED):
                n = arch.num_heads if "attn_q" in t.name else arch.num_kv_heads
                w = unpermute_rope_rows(w, n)
            if t.name.endswith("ffn_gate_inp_shexp.weight"):  # (hidden,): the gate is a 1-output linear
                w = w.reshape(1, -1)
            yield name, w
