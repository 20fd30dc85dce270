"""Calibration text and the pieces to run a model (or one layer) outside the engine.

Calibration windows are drawn from a corpus *after* its first EVAL_RESERVED tokens, which `tuneserve
eval` scores, so the text a method tunes on is not the text its quality is measured on. A forward over
fresh sequences needs a ForwardContext: `fresh_context` builds one with scratch KV blocks (every layer
writes into the same scratch cache; a fresh prompt chunk attends to its own K/V), honouring the model's
per-layer windows and an imposed sliding window with its sink tokens, as the engine does.
"""

from __future__ import annotations

import random
from itertools import zip_longest
from pathlib import Path

import torch

from tuneserve.config import ArchConfig
from tuneserve.kernels.attention import build_metadata
from tuneserve.models.layers import ForwardContext

EVAL_RESERVED = 65536  # tokens at the start of a corpus kept for evaluation
BLOCK = 16


def corpus_tokens(tokenizer, corpus: str, max_tokens: int | None = None) -> list[int]:  # noqa: ANN001
    """Token ids of a corpus (built-in name or file), optionally only its first max_tokens."""
    from tuneserve.corpus import load_corpus

    text = load_corpus(corpus)
    if max_tokens is not None:
        text = text[: max_tokens * 8]  # ~4 chars per token: a generous prefix, then cut exactly
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids[:max_tokens] if max_tokens is not None else ids


def calibration_windows(tokenizer, corpus: str, samples: int, seq_len: int,  # noqa: ANN001
                        seed: int = 0) -> list[list[int]]:
    """`samples` windows of seq_len tokens at random distinct offsets past the evaluation prefix.

    `corpus` may name several corpora joined by '+' ("wikipedia+python-docs"): the samples are split
    between them as evenly as they divide (the first ones take the remainder), interleaved in order."""
    names = [c for c in corpus.split("+") if c]
    if len(names) > 1 and not Path(corpus).is_file():
        parts = [_windows_of(tokenizer, c, samples // len(names) + (i < samples % len(names)), seq_len, seed)
                 for i, c in enumerate(names)]
        return [w for group in zip_longest(*parts) for w in group if w is not None]  # round robin
    return _windows_of(tokenizer, corpus, samples, seq_len, seed)


def _windows_of(tokenizer, corpus: str, samples: int, seq_len: int, seed: int) -> list[list[int]]:  # noqa: ANN001
    ids = corpus_tokens(tokenizer, corpus)
    lo = EVAL_RESERVED if len(ids) - EVAL_RESERVED >= samples * seq_len else 0
    span = len(ids) - lo - seq_len
    if span < samples:
        raise ValueError(f"corpus {corpus!r} has {len(ids)} tokens: too few for {samples} x {seq_len}")
    rng = random.Random(seed)
    # distinct, non-overlapping when the text allows: sample slots of seq_len tokens
    slots = span // seq_len
    starts = ([lo + s * seq_len for s in rng.sample(range(slots), samples)] if slots >= samples
              else sorted(rng.sample(range(lo, lo + span), samples)))
    return [ids[s:s + seq_len] for s in starts]


def fresh_context(arch: ArchConfig, lengths: list[int], device: torch.device, dtype: torch.dtype,
                  sliding_window: int = 0, sinks: int = 4) -> ForwardContext:
    """A ForwardContext for len(lengths) new sequences (positions 0..L-1 each), batched in order."""
    tables, nxt = [], 1
    for n in lengths:
        nb = -(-n // BLOCK)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    k = torch.zeros(nxt, BLOCK, arch.num_kv_heads, arch.head_dim, dtype=dtype, device=device)
    v = torch.zeros_like(k)
    metas, attn = {}, []
    for layer in range(arch.num_layers):
        w = arch.window_of(layer) or sliding_window
        s = sinks if sliding_window and w == sliding_window else 0
        if (w, s) not in metas:
            metas[(w, s)] = build_metadata([(0, n, t) for n, t in zip(lengths, tables)], BLOCK, device,
                                           window=w, sinks=s)
        attn.append(metas[(w, s)])
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    return ForwardContext(pos, attn, [(k, v)] * arch.num_layers)


class InputStats:
    """Running statistics of a layer's inputs: H = X^T X / n and mean |x| per input channel."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(k, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (T, K) rows of layer input."""
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        self.n += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """(K, K) mean of x x^T (the GPTQ Hessian up to a factor 2)."""
        return self.xtx / max(1, self.n)

    @property
    def abs_mean(self) -> torch.Tensor:
        """(K,) mean |x| per input channel."""
        return self.abs_sum / max(1, self.n)
