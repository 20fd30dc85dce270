"""Verification of draft tokens: speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

Given the target model's distributions p_1..p_{k+1} at the k draft positions and one past them, and the
draft distributions q_1..q_k the draft tokens d_1..d_k were sampled from:
  - accepted: d_i is kept with probability min(1, p_i(d_i) / q_i(d_i)), in order, stopping at the first
    rejection;
  - recovered: at the first rejected position i, a token is drawn from normalize(max(0, p_i - q_i));
  - bonus: when all k drafts are accepted, one more token is drawn from p_{k+1}.
The emitted tokens are then distributed exactly as sampling from the target alone. Drafts proposed
without a distribution (n-gram lookup, greedy drafting) have q_i = one-hot(d_i).
Greedy requests accept d_i iff it equals the target's argmax, and emit the argmax at the first mismatch
(or as the bonus).

Seeded requests are verified by coupling instead: the target's token at each position is its exponential
race argmax_x p_i(x) / E_i(x), with noise E_i that is a function of the request's seed and the output
position only (sample.position_generator). That is the token decoding without drafts would emit there, so
the same greedy rule then emits exactly the tokens of non-speculative sampling: the target's distribution,
and the same text whether, what and how much the request drafted. A draft is accepted with probability
P(d_i = the target's race winner): p_i(d_i) for n-gram drafts, as with rejection sampling; a draft model
that races q_i with the same noise agrees at least (1 - TV) / (1 + TV) of the time (TV the total variation
distance of p_i and q_i; Daliri et al. 2024), less than rejection sampling's 1 - TV: the price of a result
that cannot depend on the draft.
"""

from __future__ import annotations

import torch

from tuneserve.kernels.argmax_ops import argmax_rows


def verify_greedy(target_argmax: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """Greedy verification. target_argmax: k+1 argmaxes. Returns (emitted tokens, accepted count)."""
    out = []
    for i, d in enumerate(drafts):
        if target_argmax[i] != d:
            out.append(target_argmax[i])
            return out, i
        out.append(d)
    out.append(target_argmax[len(drafts)])
    return out, len(drafts)


def verify_coupled(target_probs: torch.Tensor, drafts: list[int], noise: torch.Tensor) -> tuple[list[int], int]:
    """Coupled verification. target_probs: (k + 1, V) processed; noise: (k + 1, V) Exp(1), each row that
    position's own. Returns (emitted tokens, accepted count)."""
    return verify_greedy(argmax_rows(target_probs / noise).tolist(), drafts)


def rejection_sample(
    target_probs: torch.Tensor,  # (k + 1, V) processed target distributions
    drafts: list[int],  # k draft tokens
    draft_probs: torch.Tensor | None,  # (k, V) draft distributions, None for one-hot drafts
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Speculative rejection sampling for one request. Returns (emitted tokens, accepted count)."""
    k = len(drafts)
    device = target_probs.device
    idx = torch.arange(k, device=device)
    d = torch.tensor(drafts, dtype=torch.long, device=device)
    p_d = target_probs[idx, d]
    q_d = draft_probs[idx, d] if draft_probs is not None else torch.ones_like(p_d)
    u = torch.rand(k, device=device, generator=generator)
    # accept iff u < p/q, i.e. u * q < p (no division by a zero q)
    accepted_mask = (u * q_d < p_d).tolist()
    a = next((i for i, ok in enumerate(accepted_mask) if not ok), k)
    out = drafts[:a]
    if a < k:
        residual = target_probs[a].clone()
        if draft_probs is not None:
            residual = (residual - draft_probs[a]).clamp_min_(0)
        else:
            residual[drafts[a]] = 0.0
        total = residual.sum()
        if total <= 0:  # p == q exactly: any draw from p is right
            residual = target_probs[a]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
    else:
        out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return out, a
