"""Round-to-nearest quantizers: group parameters (scale, min), optional clipping search, packing.

int4 is asymmetric by default: per group of `group` inputs, w ~ q * scale + min with q in [0, 15]
(symmetric: min = -8 * scale). int8 is symmetric: w ~ q * scale with q in [-127, 127], one scale per
output row (group = K) or per group. Scales and mins are rounded to their storage dtype before q is
chosen, so the stored grid is exactly the one quantized against.
"""

from __future__ import annotations

import torch

from tuneserve.kernels.quant_ops import pack_int4

CLIP_GRID = tuple(1.0 - 0.03 * i for i in range(11))  # range shrinks (1.0 .. 0.7) the clipping search tries


def int4_params(w: torch.Tensor, symmetric: bool = False, shrink: float | torch.Tensor = 1.0,
                dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (R, G) groups -> scale (R,), min (R,) rounded to dtype, for the range shrunk by `shrink`."""
    if symmetric:
        amax = w.abs().amax(dim=1) * shrink
        scale = (amax / 7).to(dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, (-8 * scale.float()).to(dtype)
    hi = w.amax(dim=1).clamp(min=0) * shrink
    lo = w.amin(dim=1).clamp(max=0) * shrink
    scale = ((hi - lo) / 15).to(dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo.to(dtype)


def int4_round(w: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """w: (R, G), scale/min: (R,) -> q (R, G) in [0, 15] (float)."""
    s, m = scale.float().unsqueeze(1), mn.float().unsqueeze(1)
    return ((w - m) / s).round_().clamp_(0, 15)


def search_params(w: torch.Tensor, bits: int, symmetric: bool = False, h: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float16, grid: tuple[float, ...] = CLIP_GRID,
                  rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipping search: per group (row of w), the range shrink with the least error, all shrinks at once.

    w: (R, G) groups; h: None (plain squared error), (G,) per-input weights, or (G, G) an input second
    moment (error = d h d^T, the output error). Returns scale (R,) and min (R,) (None for int8) in dtype.
    """
    shrink = torch.tensor(grid, device=w.device).view(-1, 1)  # (S, 1)
    out_s, out_m = [], []
    for r0 in range(0, w.shape[0], rows):
        wr = w[r0:r0 + rows]
        if bits == 8 or symmetric:
            amax = wr.abs().amax(1) * shrink  # (S, R)
            s = (amax / (127 if bits == 8 else 7)).to(dtype)
            s = torch.where(s > 0, s, torch.ones_like(s)).float()
            m = -8 * s if bits == 4 else torch.zeros_like(s)
            if bits == 4:
                m = m.to(dtype).float()
        else:
            hi, lo = wr.amax(1).clamp(min=0) * shrink, wr.amin(1).clamp(max=0) * shrink
            s = ((hi - lo) / 15).to(dtype)
            s = torch.where(s > 0, s, torch.ones_like(s)).float()
            m = lo.to(dtype).float()
        qmin, qmax = (-127, 127) if bits == 8 else (0, 15)
        q = ((wr - m.unsqueeze(-1)) / s.unsqueeze(-1)).round_().clamp_(qmin, qmax)  # (S, R, G)
        d = q.mul_(s.unsqueeze(-1)).add_(m.unsqueeze(-1)).sub_(wr)
        if h is None:
            err = d.pow(2).sum(-1)
        elif h.dim() == 1:
            err = (d.pow(2) * h).sum(-1)
        else:
            err = ((d @ h) * d).sum(-1)
        best = err.argmin(0, keepdim=True)  # (1, R)
        out_s.append(s.gather(0, best)[0])
        out_m.append(m.gather(0, best)[0])
    s, m = torch.cat(out_s).to(dtype), torch.cat(out_m)
    return s, (m.to(dtype) if bits == 4 else None)


def quantize_int4(w: torch.Tensor, group: int, symmetric: bool = False, search: bool = False,
                  dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: (N, K) -> packed (N, K/2) uint8, scales (N, K/group), mins (N, K/group)."""
    n, k = w.shape
    wg = w.float().reshape(n * (k // group), group)
    if search:
        s, m = search_params(wg, 4, symmetric, None, dtype)
    else:
        s, m = int4_params(wg, symmetric, 1.0, dtype)
    q = int4_round(wg, s, m).to(torch.uint8).view(n, k)
    return pack_int4(q), s.view(n, k // group), m.view(n, k // group)


def int8_params(w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w: (R, G) -> symmetric scale (R,) rounded to dtype."""
    s = (w.abs().amax(dim=1) / 127).to(dtype)
    return torch.where(s > 0, s, torch.ones_like(s))


def int8_round(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w: (R, G), scale (R,) -> q (R, G) in [-127, 127] (float)."""
    return (w / scale.float().unsqueeze(1)).round_().clamp_(-127, 127)


def quantize_int8(w: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (N, K) -> int8 (N, K), scales (N, K/group): fp32 per row (group None or K), fp16 per group."""
    n, k = w.shape
    group = group or k
    dtype = torch.float32 if group == k else torch.float16
    wg = w.float().reshape(n * (k // group), group)
    s = int8_params(wg, dtype)
    return int8_round(wg, s).to(torch.int8).view(n, k), s.view(n, k // group)


def fake_quant(w: torch.Tensor, bits: int, group: int, symmetric: bool = False,
               search: bool = False) -> torch.Tensor:
    """w: (N, K) -> its RTN-quantized values (N, K) fp32, unpacked (for searches)."""
    n, k = w.shape
    wg = w.float().reshape(n * (k // group), group)
    if bits == 8:
        s = int8_params(wg, torch.float32 if group == k else torch.float16)
        return (int8_round(wg, s) * s.float().unsqueeze(1)).view(n, k)
    if search:
        s, m = search_params(wg, 4, symmetric)
    else:
        s, m = int4_params(wg, symmetric)
    return (int4_round(wg, s, m) * s.float().unsqueeze(1) + m.float().unsqueeze(1)).view(n, k)
