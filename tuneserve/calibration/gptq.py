"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

Loss: ||X W^T - X Q^T||^2 over calibration inputs X, i.e. tr((W - Q) H (W - Q)^T) with H = X^T X / n.
Steps: damp H (add `damp` x mean diagonal), optionally order columns by decreasing H diagonal
(act-order: the inputs with the largest activations go first, while the most columns remain to absorb
their error), take the upper Cholesky factor U of H^-1, then for each column i: q_i = round(w_i),
e = (w_i - q_i) / U_ii, w_j -= e U_ij for j > i; updates are applied lazily in blocks of 128 columns.
Group parameters (scale, min) are chosen when the loop enters a group, from the error-updated weights;
with `clip_search` they minimise the group's H-weighted output error over a grid of range shrinks.
With act-order the groups are contiguous in the permuted order, and the layer keeps the permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from tuneserve.quant.rtn import int4_params, int4_round, int8_params, int8_round, search_params

BLOCK = 128


def group_params(w: torch.Tensor, bits: int, symmetric: bool, h: torch.Tensor | None, search: bool,
                 dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w: (N, G) one group of columns, h: (G, G) its block of H -> scale (N,), min (N,) or None (int8),
    rounded to dtype; with search, the range shrink with the least H-weighted error."""
    if search:
        return search_params(w, bits, symmetric, h, dtype)
    if bits == 8:
        return int8_params(w, dtype), None
    return int4_params(w, symmetric, 1.0, dtype)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run small tensor ops on one thread: the column loop issues thousands of tiny ops, and on a shared
    CPU every multi-threaded one can wait milliseconds for a descheduled worker."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _codes(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, C) -> integer codes (N, C) and their dequantized values."""
    if m is None:
        q = int8_round(w, s)
        return q, q * s.float().unsqueeze(1)
    q = int4_round(w, s, m)
    return q, q * s.float().unsqueeze(1) + m.float().unsqueeze(1)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int = 4, group: int | None = None,
                  symmetric: bool = False, act_order: bool = True, damp: float = 0.01,
                  clip_search: bool = True) -> dict:
    """w: (N, K) weight, h: (K, K) input second moment -> {'q': codes (N, K) in quantized column order,
    'scales', 'mins' (None for int8): (N, K/group), 'perm': (K,) or None, 'w_hat': dequantized (N, K)
    in the original order}."""
    w = w.float().clone()
    n, k = w.shape
    group = group or k
    h = h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    h_orig = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)  # LU-based: several times faster here than cholesky_inverse, same result
    u = torch.linalg.cholesky((hinv + hinv.t()) / 2, upper=True)
    q = torch.empty(n, k, device=w.device)
    scales, mins = [], []
    if group >= k:  # one group per row (per channel): parameters from the whole row, up front
        dtype = torch.float32 if bits == 8 else torch.float16
        s, m = group_params(w, bits, symmetric, h_orig, clip_search, dtype)
        scales.append(s)
        mins.append(m)
    step = group if group < k else BLOCK  # columns between parameter choices
    block = max(BLOCK, group) if group < k else BLOCK
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros(n, b1 - b0, device=w.device)
        u1 = u[b0:b1, b0:b1]
        for c0 in range(0, b1 - b0, step):
            c1 = min(b1 - b0, c0 + step)
            if group < k:
                g = slice(b0 + c0, b0 + c1)
                s, m = group_params(w1[:, c0:c1], bits, symmetric, h_orig[g, g], clip_search)
                scales.append(s)
                mins.append(m)
            with single_thread():
                for i in range(c0, c1):
                    codes, deq = _codes(w1[:, i:i + 1], s, m)
                    q[:, b0 + i] = codes[:, 0]
                    e = (w1[:, i] - deq[:, 0]) / u1[i, i]
                    w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
                    err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return _result(q, scales, mins, bits, group, perm)


def _result(q: torch.Tensor, scales: list, mins: list, bits: int, group: int,
            perm: torch.Tensor | None) -> dict:
    n, k = q.shape
    sc = torch.stack(scales, dim=1)
    mn = torch.stack(mins, dim=1) if bits == 4 else None
    w_hat = q.view(n, -1, min(group, k)) * sc.float().unsqueeze(-1)
    if mn is not None:
        w_hat = w_hat + mn.float().unsqueeze(-1)
    w_hat = w_hat.view(n, k)
    if perm is not None:
        w_hat = w_hat[:, torch.argsort(perm)]
    return {"q": q, "scales": sc, "mins": mn, "perm": perm, "w_hat": w_hat}


def weighted_error(d: torch.Tensor, h: torch.Tensor) -> float:
    """d: (N, K) weight error, h: (K, K) -> tr(d h d^T)."""
    return float(((d @ h) * d).sum())


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T) / N: the mean squared output error per row on the inputs of H."""
    return weighted_error((w - w_hat).float(), h) / w.shape[0]
