"""Paged attention over a ragged batch, in portable PyTorch.

A step's tokens are flattened into one (N, ...) batch. Each layer writes its new K/V into the paged cache
through `slot_mapping`, then attends. Requests with short queries (decodes, speculative verification,
the tail of a prompt) are attended together: their block tables are gathered into a padded
(B, T, Hkv, D) view and one SDPA call covers them all, with the query heads of a KV group folded into
the query axis so K/V are never repeated. Longer prompt chunks are attended one request at a time,
where the matmul dwarfs the call overhead.

Masks encode causality, the group's sliding window (`window` tokens back, 0 = none) and attention sinks
(the first `sinks` tokens stay visible), so every layer type uses the same two code paths.

On the CPU the short queries can take a compiled kernel (csrc/paged_attention.c) instead; whether a
model's layers use it is decided once at load (KernelConfig.attention, kernels/config.py) and passed in
as `compiled`.

Attention logit soft-capping (gemma2: scores -> cap * tanh(scores / cap) before the mask and softmax) is
computed by the portable path only, with the scores written out instead of SDPA's fused kernel; the
compiled kernel has no cap, so a softcapped call never takes it, whatever `compiled` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tuneserve.core.window import Window
from tuneserve.kernels import libraries

SHORT_QUERY_MAX = 16  # queries up to this long go through the batched short-query path


@dataclass
class PrefillSeq:
    """One long query chunk: rows q_start:q_end of the batch, positions start_pos..."""

    q_start: int
    q_end: int
    start_pos: int
    block_table: torch.Tensor  # (num_blocks,) long
    positions: torch.Tensor  # (L,) long


@dataclass
class AttentionMetadata:
    """What one KV group's layers need to attend, built once per step."""

    block_size: int
    slot_mapping: torch.Tensor  # (N,) long: where each new token's K/V goes
    num_tokens: int
    # short-query group, padded to (B, Qm)
    short_rows: torch.Tensor | None = None  # (B*Qm,) rows of the batch, padding repeats a valid row
    short_qpos: torch.Tensor | None = None  # (B, Qm) positions, -1 for padding
    short_block_table: torch.Tensor | None = None  # (B, nb) long, padded with the null block
    short_valid: torch.Tensor | None = None  # (B*Qm,) bool, None when nothing is padded
    short_is_all: bool = False  # the short group is the whole batch, in order, unpadded
    # the same rows unpadded, for the compiled kernel (CPU tensors)
    flat_rows: torch.Tensor | None = None  # (R,) rows of the batch
    flat_qpos: torch.Tensor | None = None  # (R,) their positions
    flat_seq: torch.Tensor | None = None  # (R,) their index into short_block_table
    prefills: list[PrefillSeq] = field(default_factory=list)
    window: int = 0  # sliding window of this group's layers, 0 = full attention
    sinks: int = 0  # attention sinks (first positions always visible) of a windowed group
    _short_mask: torch.Tensor | None = None

    @property
    def attn_window(self) -> Window:
        """The visibility rule of this group's layers (core/window.py), which masks and tables follow."""
        return Window(self.window, self.sinks)

    def short_mask(self) -> torch.Tensor:
        """(B, 1, Qm, T) bool: which cached positions each padded query may see."""
        if self._short_mask is None:
            num_slots = self.short_block_table.shape[1] * self.block_size
            t = torch.arange(num_slots, device=self.slot_mapping.device)
            m = _allowed(self.short_qpos.unsqueeze(-1), t, self.window, self.sinks)
            m[..., 0] |= self.short_qpos < 0  # padded queries see position 0 so softmax stays finite
            self._short_mask = m.unsqueeze(1)
        return self._short_mask


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Broadcast qpos against kpos: True where the query may see the key. Exactly Window(window,
    sinks).sees, vectorised (tests/test_window.py checks they agree on every pair in a range)."""
    ok = kpos <= qpos
    if window:
        near = kpos > qpos - window
        ok &= near | (kpos < sinks) if sinks else near
    return ok


def build_metadata(
    seqs: list[tuple[int, int, list[int]]],
    block_size: int,
    device: torch.device,
    window: int = 0,
    sinks: int = 0,
) -> AttentionMetadata:
    """Metadata for a ragged batch of (start_pos, num_query_tokens, block_table) in batch order; window and
    sinks as in Window (core/window.py), which the masks and the windowed block reads follow."""
    rule = Window(window, sinks)  # rejects negative sizes before they reach a mask or the C kernel
    slots: list[int] = []
    short, prefills = [], []
    row = 0
    for start, n, table in seqs:
        for p in range(start, start + n):
            slots.append(table[p // block_size] * block_size + p % block_size)
        if n <= SHORT_QUERY_MAX:
            short.append((row, start, n, table))
        else:
            pos = torch.arange(start, start + n, device=device)
            prefills.append(PrefillSeq(row, row + n, start, torch.tensor(table, device=device), pos))
        row += n
    meta = AttentionMetadata(block_size, torch.tensor(slots, dtype=torch.long, device=device), row,
                             prefills=prefills, window=rule.size, sinks=rule.sinks)
    if short:
        _build_short(meta, short, row, device)
    return meta


def _build_short(meta: AttentionMetadata, short: list, num_rows: int, device: torch.device) -> None:
    b = len(short)
    qm = max(n for _, _, n, _ in short)
    nb = max(-(-(s + n) // meta.block_size) for _, s, n, _ in short)
    rows, qpos, table, flat_rows, flat_pos, flat_seq = [], [], [], [], [], []
    for i, (r, s, n, bt) in enumerate(short):
        rows += list(range(r, r + n)) + [r] * (qm - n)
        qpos += list(range(s, s + n)) + [-1] * (qm - n)
        table.append(bt[:nb] + [0] * (nb - min(nb, len(bt))))
        flat_rows += range(r, r + n)
        flat_pos += range(s, s + n)
        flat_seq += [i] * n
    meta.short_rows = torch.tensor(rows, dtype=torch.long, device=device)
    meta.short_qpos = torch.tensor(qpos, dtype=torch.long, device=device).view(b, qm)
    meta.short_block_table = torch.tensor(table, dtype=torch.long, device=device)
    padded = len(flat_rows) != b * qm
    meta.short_valid = (meta.short_qpos >= 0).flatten() if padded else None
    meta.short_is_all = not padded and flat_rows == list(range(num_rows))
    meta.flat_rows = torch.tensor(flat_rows, dtype=torch.long)
    meta.flat_qpos = torch.tensor(flat_pos, dtype=torch.long)
    meta.flat_seq = torch.tensor(flat_seq, dtype=torch.long)


def paged_attention(
    q: torch.Tensor,  # (N, H, D)
    k: torch.Tensor,  # (N, Hkv, D)
    v: torch.Tensor,  # (N, Hkv, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    compiled: bool | None = None,
    softcap: float = 0.0,
    prompt_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every query to its request's cache. -> (N, H, D)
    compiled: whether short queries may take the compiled kernel (a bound KernelConfig's choice; True
    promises it is built); None: wherever it is built. softcap: cap of the attention scores, 0 for none
    (the portable path then, see above). prompt_dtype: what the prompt chunks' q, K and V are rounded to
    for SDPA, None: their own (bf16 where the step's projections ran bf16 tiles; the cache keeps its dtype)."""
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, hkv, d).index_copy_(0, meta.slot_mapping, v)
    allowed = compiled_available() if compiled is None else compiled
    use_c = allowed and not softcap and meta.short_rows is not None and short_attention_c_ok(q, k_cache)
    if meta.short_is_all and not use_c:
        return _short_attention(q, k_cache, v_cache, meta, scale, softcap)
    out = torch.empty_like(q)
    if use_c:
        short_attention_c(q, out, k_cache, v_cache, meta, scale)
    elif meta.short_rows is not None:
        o = _short_attention(q, k_cache, v_cache, meta, scale, softcap)
        rows = meta.short_rows
        if meta.short_valid is not None:
            o, rows = o[meta.short_valid], rows[meta.short_valid]
        out.index_copy_(0, rows, o)
    for p in meta.prefills:
        out[p.q_start:p.q_end] = _prefill_attention(q[p.q_start:p.q_end], k[p.q_start:p.q_end],
                                                    v[p.q_start:p.q_end], k_cache, v_cache, p, meta, scale,
                                                    softcap, prompt_dtype)
    return out


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float, softcap: float) -> torch.Tensor:
    """F.scaled_dot_product_attention (mask None: causal, with as many queries as keys), or with softcap
    its math written out, the scaled scores capped as HF's eager attention does."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    return s.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _short_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                     softcap: float = 0.0) -> torch.Tensor:
    """All short queries in one SDPA call. Returns (B*Qm, H, D) in padded row order."""
    b, qm = meta.short_qpos.shape
    h, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    g = h // hkv
    qs = q.index_select(0, meta.short_rows).view(b, qm, hkv, g, d)
    qs = qs.permute(0, 2, 3, 1, 4).reshape(b, hkv, g * qm, d)  # heads of a KV group folded into queries
    keys = k_cache[meta.short_block_table].view(b, -1, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
    vals = v_cache[meta.short_block_table].view(b, -1, hkv, d).transpose(1, 2)
    mask = meta.short_mask()  # (B, 1, Qm, T)
    if g > 1:
        mask = mask.unsqueeze(2).expand(b, 1, g, qm, mask.shape[-1]).reshape(b, 1, g * qm, -1)
    o = _sdpa(qs, keys, vals, mask, scale, softcap)  # (B, Hkv, G*Qm, D)
    return o.view(b, hkv, g, qm, d).permute(0, 3, 1, 2, 4).reshape(b * qm, h, d)


def _prefill_attention(q, k, v, k_cache, v_cache, p: PrefillSeq, meta: AttentionMetadata,
                       scale: float, softcap: float = 0.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One long query chunk against its request's cache. q: (L, H, D) -> (L, H, D) in q's dtype; dtype: what q, K
    and V are rounded to for SDPA (torch's bf16 CPU kernel is ~2x its fp32 one; soft-capping stays fp32)."""
    hkv, d, out_dtype = k.shape[1], k.shape[2], q.dtype
    kpos = None
    if p.start_pos == 0:
        keys, vals = k, v  # a fresh prompt: this chunk is the whole context
    else:
        table, kpos = _visible_blocks(p, meta)
        end = p.q_end - p.q_start + p.start_pos
        keys = k_cache[table].view(-1, hkv, d)
        vals = v_cache[table].view(-1, hkv, d)
        if kpos is None:
            keys, vals = keys[:end], vals[:end]
        else:  # a windowed layer reads only the blocks its queries can see: linear, not quadratic, cost
            inside = kpos < end
            keys, vals, kpos = keys[inside], vals[inside], kpos[inside]
    if dtype not in (None, q.dtype) and not softcap:
        q, keys, vals = q.to(dtype), keys.to(dtype), vals.to(dtype)
    g = q.shape[1] // hkv
    # (1, H, L, D) and K/V repeated per query head: 4-D inputs without GQA take torch's fused CPU kernel,
    # which is ~5x faster here than the 3-D or enable_gqa paths
    qh = q.transpose(0, 1).unsqueeze(0)
    kh = keys.transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
    vh = vals.transpose(0, 1).repeat_interleave(g, dim=0).unsqueeze(0)
    if p.start_pos == 0 and not meta.window:
        o = _sdpa(qh, kh, vh, None, scale, softcap)
    else:
        if kpos is None:
            kpos = torch.arange(kh.shape[2], device=q.device)
        mask = _allowed(p.positions.unsqueeze(-1), kpos, meta.window, meta.sinks)
        o = _sdpa(qh, kh, vh, mask, scale, softcap)
    return o.squeeze(0).transpose(0, 1).to(out_dtype)


def _visible_blocks(p: PrefillSeq, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block ids a chunk after cached context reads, and (windowed groups) the positions of their slots."""
    if not meta.window:
        return p.block_table, None
    bs = meta.block_size
    sink_blocks, first = meta.attn_window.kept_blocks(p.start_pos, bs)
    dev = p.block_table.device
    idx = torch.cat([torch.arange(sink_blocks, device=dev),
                     torch.arange(first, p.block_table.shape[0], device=dev)])
    kpos = (idx.unsqueeze(1) * bs + torch.arange(bs, device=dev)).flatten()
    return p.block_table[idx], kpos


MAX_HEAD_DIM = 256  # csrc/paged_attention.c's MAX_D: a head's scaled query lives on the stack


def compiled_available() -> bool:
    """Whether the compiled attention kernel is built here."""
    return libraries.paged_attention() is not None


def short_attention_c_ok(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the compiled CPU kernel takes these operands (CPU, fp32, head size at most MAX_HEAD_DIM,
    contiguous q)."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and q.shape[2] <= MAX_HEAD_DIM and q.is_contiguous())


def short_attention_c(q, out, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> None:
    """The short-query group through the compiled kernel, written into out's rows."""
    lib = libraries.paged_attention()
    bt = meta.short_block_table
    h, d = q.shape[1], q.shape[2]
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    lib.paged_attention_f32(
        q.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), meta.flat_rows.data_ptr(),
        meta.flat_qpos.data_ptr(), meta.flat_seq.data_ptr(), bt.data_ptr(), bt.shape[1],
        meta.flat_rows.numel(), h, hkv, d, bs, meta.window, meta.sinks, scale)


