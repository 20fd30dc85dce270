"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling input channels.

For a linear layer with inputs X, scaling input channel j of W by s_j and of X by 1 / s_j leaves the
product unchanged but changes what rounding does: channels with large s_j are quantized more finely
relative to their weights. s = mean|x|^alpha (normalised), with alpha chosen on a grid in [0, 1] to
minimise the layer's output error after group-wise quantization. The error is measured exactly over
all calibration tokens through the input second moment H = X^T X / n:
err(W_hat) = tr((W - W_hat) H (W - W_hat)^T). Then each group's range is shrunk where that lowers the
same H-weighted error (clipping search), and the scaled weights are rounded to nearest.
The 1 / s on the inputs is folded into the preceding RMSNorm weight where one feeds the layer directly
(q|k|v, gate|up), and otherwise kept as the layer's `input_scale`.
For q|k|v, alpha is chosen on the attention block's output instead (as AutoAWQ does): errors in q and k
pass through the softmax, so equal output error in q, k and v rows does not cost the same. Measured on
Qwen2.5-Coder-0.5B with only q|k|v quantized (g128, wikipedia): perplexity 39.12 unquantized, RTN 41.81,
AWQ on the layer's output error 40.06, AWQ on the attention output 39.51.
gate|up's ranges are not clipped (sequential.UNCLIPPED). The engine's default `awq_rounding="gptq"` rounds
the scaled weights by GPTQ instead of to nearest, and keeps the scales only where they lower the loss after
that rounding (sequential.Calibrator._awq_gptq); `awq_rounding="rtn"` is AWQ as published.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tuneserve.calibration.gptq import group_params, weighted_error


def _quant_dequant(w: torch.Tensor, bits: int, group: int, symmetric: bool, h: torch.Tensor | None,
                   search: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w: (N, K) -> (dequantized (N, K), scales (N, K/group), mins or None), group by group."""
    n, k = w.shape
    dtype = torch.float32 if bits == 8 and group == k else torch.float16
    out, scales, mins = torch.empty_like(w), [], []
    for g0 in range(0, k, group):
        wg = w[:, g0:g0 + group]
        hg = h[g0:g0 + group, g0:g0 + group] if h is not None else None
        s, m = group_params(wg, bits, symmetric, hg, search, dtype)
        if m is None:
            sf = s.float().unsqueeze(1)
            out[:, g0:g0 + group] = (wg / sf).round().clamp(-127, 127) * sf
        else:
            q = ((wg - m.float().unsqueeze(1)) / s.float().unsqueeze(1)).round().clamp(0, 15)
            out[:, g0:g0 + group] = q * s.float().unsqueeze(1) + m.float().unsqueeze(1)
        scales.append(s)
        mins.append(m)
    return out, torch.stack(scales, 1), (torch.stack(mins, 1) if mins[0] is not None else None)


def choice_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor,
                loss: Callable[[torch.Tensor], float] | None) -> float:
    """What AWQ chooses by: `loss(w_hat)` where given (a block's output error), else the layer's output error."""
    return loss(w_hat) if loss is not None else weighted_error(w_hat - w, h)


@torch.no_grad()
def awq_search(w: torch.Tensor, h: torch.Tensor, abs_mean: torch.Tensor, bits: int, group: int,
               symmetric: bool = False, grid: int = 20,
               loss: Callable[[torch.Tensor], float] | None = None) -> tuple[torch.Tensor, float]:
    """w: (N, K), h: (K, K), abs_mean: (K,) -> the input-channel scales s (K,) and the chosen alpha.
    `loss(w_hat)` replaces the layer's output error as the criterion where given (the block's output
    error: see sequential.py)."""
    w = w.float()
    x = abs_mean.float().clamp(min=1e-6)
    best = (float("inf"), torch.ones_like(x), 0.0)
    for i in range(grid + 1):
        alpha = i / grid
        s = x.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1 so the scaled weights keep their range
        w_hat = _quant_dequant(w * s, bits, group, symmetric, None, False)[0] / s
        err = choice_loss(w, w_hat, h, loss)
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


def scaled_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """H of the inputs x / s that the scaled weight W diag(s) sees: diag(1/s) H diag(1/s)."""
    return h / s.unsqueeze(0) / s.unsqueeze(1)


@torch.no_grad()
def awq_quantize(w: torch.Tensor, h: torch.Tensor, abs_mean: torch.Tensor, bits: int = 4, group: int = 128,
                 symmetric: bool = False, grid: int = 20, clip_search: bool = True,
                 loss: Callable[[torch.Tensor], float] | None = None) -> dict:
    """w: (N, K) -> {'s': input scales (K,), 'alpha', 'q_w': the scaled weight W diag(s) quantized as
    (dequantized (N, K), scales, mins), 'w_hat': the effective weight (N, K)}."""
    s, alpha = awq_search(w, h, abs_mean, bits, group, symmetric, grid, loss)
    deq, scales, mins = _quant_dequant(w.float() * s, bits, group, symmetric, scaled_hessian(h, s), clip_search)
    return {"s": s, "alpha": alpha, "deq": deq, "scales": scales, "mins": mins, "w_hat": deq / s}
