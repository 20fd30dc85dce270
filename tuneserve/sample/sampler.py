"""Batched sampler: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Order of operations (as vLLM): penalties and min_tokens act on the logits; greedy rows take the argmax;
the others are divided by their temperature, truncated by top-k, top-p and min-p, and sampled with
the exponential-race trick (argmax of p / E, E ~ Exp(1)), which equals sampling from p. A seeded
request draws its E from its own generator, so its tokens do not depend on what else is in the batch.
Logprobs are the model's raw log-softmax, before any processing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from tuneserve.kernels.argmax_ops import argmax_rows
from tuneserve.outputs import TokenLogprobs
from tuneserve.sampling_params import SamplingParams


class TokenSpan(Sequence):
    """tokens[start:end] followed by `extra`, without copying `tokens`: a request's history as one sampling
    row sees it. Building a row each step then costs nothing in the length of the output; only the
    penalties, which need the history, read it."""

    __slots__ = ("tokens", "start", "end", "extra")

    def __init__(self, tokens: list[int], start: int, end: int, extra: Sequence[int] = ()) -> None:
        self.tokens, self.start, self.end, self.extra = tokens, start, end, extra

    def __len__(self) -> int:
        return self.end - self.start + len(self.extra)

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - an index or a slice, as list
        return self.tolist()[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self.tolist())

    def tolist(self) -> list[int]:
        return self.tokens[self.start:self.end] + list(self.extra)


@dataclass
class SamplingRow:
    """One position to sample: the request's parameters, its generator and its token history."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_ids: Sequence[int]  # a list or a TokenSpan
    output_ids: Sequence[int]  # tokens generated before this position
    eos_ids: tuple[int, ...] = ()


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (prompt + output), presence and frequency (output) penalties, then logit_bias, then
    min_tokens, in place (so a bias cannot revive a token that min_tokens bans)."""
    vocab = logits.shape[1]
    for i, r in enumerate(rows):
        p = r.params
        if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0:
            out = torch.tensor(list(r.output_ids), dtype=torch.long, device=logits.device)
            counts = torch.zeros(vocab, device=logits.device)
            counts.index_add_(0, out, torch.ones_like(out, dtype=torch.float))
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                seen[torch.tensor(list(r.prompt_ids), dtype=torch.long, device=logits.device)] = True
                row = logits[i]
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                # a banned token (-inf: a grammar's mask) stays banned: -inf times a penalty that rounds to 0
                # in the logits' dtype would be NaN
                logits[i] = torch.where(seen & (row != float("-inf")), penalized, row)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if p.logit_bias:
            apply_logit_bias(logits[i], p.logit_bias)
        if len(r.output_ids) < p.min_tokens:
            banned = [t for t in (*([] if p.ignore_eos else r.eos_ids), *p.stop_token_ids) if t < vocab]
            logits[i, banned] = float("-inf")
    return logits


def apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    """OpenAI's logit_bias on one row of logits, in place: each token's bias is added to its logit.

    Ids past the row (validated away at the edge) are skipped rather than trusted."""
    items = [(t, b) for t, b in bias.items() if t < row.shape[0]]
    if items:
        ids = torch.tensor([t for t, _ in items], dtype=torch.long, device=row.device)
        row.index_add_(0, ids, torch.tensor([b for _, b in items], dtype=row.dtype, device=row.device))


def processed_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Probabilities after temperature, top-k, top-p and min-p (rows with temperature 0 untouched)."""
    temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=logits.device)
    # extreme penalties or temperatures can overflow a logit to +inf: keep it the largest finite value
    logits = (logits / temps.unsqueeze(1)).clamp(max=torch.finfo(logits.dtype).max)
    need_sort = [i for i, r in enumerate(rows) if r.params.top_k > 0 or r.params.top_p < 1.0]
    if need_sort:
        sub = logits[need_sort]
        sorted_l, order = sub.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_l, dtype=torch.bool)
        ks = torch.tensor([rows[i].params.top_k or sub.shape[1] for i in need_sort], device=logits.device)
        keep &= torch.arange(sub.shape[1], device=logits.device).unsqueeze(0) < ks.unsqueeze(1)
        ps = torch.tensor([rows[i].params.top_p for i in need_sort], device=logits.device)
        probs_sorted = sorted_l.masked_fill(~keep, float("-inf")).softmax(-1)
        before = probs_sorted.cumsum(-1) - probs_sorted  # mass strictly above each token
        keep &= before < ps.unsqueeze(1)
        keep[:, 0] = True  # the most likely token always stays (a denormal top_p reads as 0 under flush-to-zero)
        sorted_l = sorted_l.masked_fill(~keep, float("-inf"))
        logits[need_sort] = torch.full_like(sub, float("-inf")).scatter(1, order, sorted_l)
    probs = logits.softmax(-1)
    min_ps = [r.params.min_p for r in rows]
    if any(min_ps):
        mp = torch.tensor(min_ps, device=logits.device).unsqueeze(1)
        probs = probs.masked_fill(probs < mp * probs.max(-1, keepdim=True).values, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def exponential_noise(shape: tuple[int, int], rows: list[SamplingRow], device: torch.device) -> torch.Tensor:
    """Exp(1) noise per row, drawn from each row's own generator where it has one."""
    noise = torch.empty(shape, device=device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty((len(unseeded), shape[1]), device=device).exponential_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    return noise


_MASK64 = (1 << 64) - 1


def position_generator(seed: int, position: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a seeded request's output position: a function of (seed, position) only.

    Tokens then do not depend on what drew randomness before them (the batch, drafts, verification,
    preemption). The pair is hashed (splitmix64's finalizer) rather than added, so that neighbouring seeds
    do not share noise rows shifted by one, and so that the low 32 bits, all that the CPU generator uses,
    depend on every bit of both.
    """
    z = ((seed & _MASK64) ^ ((position + 1) * 0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return torch.Generator(device=device).manual_seed(z ^ (z >> 31))


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """logits: (R, V) fp32 -> sampled token ids (R,)."""
    if any(r.params.uses_penalties or r.params.min_tokens for r in rows):
        logits = apply_penalties(logits.clone(), rows)
    greedy = [r.params.greedy for r in rows]
    if all(greedy):
        return argmax_rows(logits)
    probs = processed_probs(logits, rows)
    drawn = argmax_rows(probs / exponential_noise(probs.shape, rows, logits.device))
    if any(greedy):
        mask = torch.tensor(greedy, device=logits.device)
        drawn = torch.where(mask, argmax_rows(logits), drawn)
    return drawn


def token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """Per row: the chosen token's raw logprob and rank, and the top-N alternatives.

    logprobs: (R, V) log-softmax; chosen: (R,) token ids; num_top: N per row.
    """
    k = max(num_top, default=0)
    top_v, top_i = (logprobs.topk(k, dim=-1) if k else (None, None))
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen_lp.unsqueeze(1)).sum(-1) + 1
    out = []
    cl, rk = chosen_lp.tolist(), ranks.tolist()
    tv = top_v.tolist() if k else None
    ti = top_i.tolist() if k else None
    for r, n in enumerate(num_top):
        top = list(zip(ti[r][:n], tv[r][:n])) if n else []
        out.append(TokenLogprobs(int(chosen[r]), cl[r], rk[r], top))
    return out
