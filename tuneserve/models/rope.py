"""Rotary frequency variants: a `RopeScaling` (config.py) -> inverse frequencies and an attention factor.

The math follows HF transformers' modeling_rope_utils (the reference our tests compare against); the
attention factor multiplies cos and sin, so q.k is scaled by its square, as HF does. Everything is
computed once per model, in float64: a variant whose frequencies HF would change while serving must be
equal to a fixed table over the positions we serve, or be refused where the config is read.

- default:  inv_freq[i] = theta^(-2i/d)
- linear:   inv_freq / factor
- dynamic:  NTK base growth past max_position_embeddings only. The engine never serves past it
            (engine_args refuses a longer max_model_len), so over the served positions HF uses the
            unscaled frequencies, and so do we.
- yarn:     interpolate low frequencies, keep high ones, a linear ramp between (beta_fast/beta_slow
            rotations within the original context); attention factor 0.1 ln(factor) + 1 (or the
            mscale / mscale_all_dim ratio, or as given).
- llama3:   divide low frequencies (wavelength > original / low_freq_factor) by factor, keep high ones,
            blend smoothly between; or explicit per-frequency divisors (GGUF rope_freqs.weight).
- longrope: per-frequency divisors, the long set when the served length exceeds the original context,
            else the short set (HF switches per forward call; a paged cache shared across steps cannot,
            so the choice is fixed by the configured length, as llama.cpp does); attention factor
            sqrt(1 + ln(factor) / ln(original)) unless given.
"""

from __future__ import annotations

import math

import torch

from tuneserve.config import ROPE_TYPES, RopeScaling


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _divisors(name: str, values: tuple[float, ...], dim: int) -> torch.Tensor:
    if len(values) != dim // 2:
        raise ValueError(f"rope scaling {name} has {len(values)} entries, expected head_dim / 2 = {dim // 2}")
    return torch.tensor(values, dtype=torch.float64)


def _yarn(inv: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    orig = s.original_max_position_embeddings

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over orig tokens
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 0.001)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate by factor
    inv = inv / s.factor * (1 - keep) + inv * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        att = s.attention_factor
    elif s.mscale and s.mscale_all_dim:
        att = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    else:
        att = mscale(s.factor)
    return inv, att


def _llama3(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    orig = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = orig / s.low_freq_factor, orig / s.high_freq_factor
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)


def rope_frequencies(head_dim: int, theta: float, s: RopeScaling, served_len: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, float64 (head_dim / 2,), attention factor) of a rotary embedding."""
    inv = _base_inv_freq(head_dim, theta)
    t = s.rope_type
    if t not in ROPE_TYPES:
        raise ValueError(f"rope_type {t!r} is not supported; supported: {list(ROPE_TYPES)}")
    if s.freq_factors:  # given outright: llama.cpp's form of llama3 scaling
        return inv / _divisors("freq_factors", s.freq_factors, head_dim), 1.0
    if t == "linear":
        return inv / s.factor, 1.0
    if t == "yarn":
        return _yarn(inv, head_dim, theta, s)
    if t == "llama3":
        return _llama3(inv, s), 1.0
    if t == "longrope":
        orig = s.original_max_position_embeddings
        long = served_len > orig
        ext = _divisors("long_factor" if long else "short_factor", s.long_factor if long else s.short_factor,
                        head_dim)
        att = s.attention_factor
        if att is None:
            att = math.sqrt(1 + math.log(s.factor) / math.log(orig)) if s.factor > 1 else 1.0
        return inv / ext, att
    return inv, 1.0  # default; dynamic over positions up to max_position_embeddings (see above)
