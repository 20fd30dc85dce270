"""What a quantization (or a sliding window) costs in quality: perplexity, KL divergence, top-1 agreement.

Text is cut into fixed-length windows (default 512 tokens, stride 512: no overlap); window i scores only
the tokens after the previous window's end (bench/corpus.eval_windows), each predicted from the tokens
before it in its window. Every model runs the engine's own forward (paged attention, the same kernels)
on one window at a time; the reference (the first model: the unquantized one with full attention) runs
on the same window, and logits are compared chunk by chunk so memory stays bounded even for 150k-token
vocabularies.
  perplexity      exp(mean negative log-likelihood of the scored tokens)
  kl_divergence   mean over scored positions of KL(P_reference || P_model), in nats
  top1_agreement  fraction of scored positions where both models' argmax tokens agree
  weight_bytes    bytes of all the model's parameters and persistent buffers (packed weights, scales, norms)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

ROW_CHUNK = 128  # logit rows compared at a time


@dataclass
class Scores:
    """Running sums for one model."""

    name: str
    weight_bytes: int
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    n: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def result(self) -> dict:
        """The metrics as a JSON-able dict."""
        n = max(1, self.n)
        return {"name": self.name, "perplexity": float(torch.tensor(self.nll / n).exp()),
                "kl_divergence": self.kl / n, "top1_agreement": self.agree / n,
                "weight_bytes": self.weight_bytes, "tokens_scored": self.n, "forward_seconds": self.seconds,
                **self.extra}


def scored_rows(windows: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Per window (start, end): (start, end, first scored row): row r predicts token start + r + 1; rows
    before `first` were scored by the previous window."""
    out, prev_end = [], 0
    for s, e in windows:
        first = max(s + 1, prev_end) - s - 1
        out.append((s, e, first))
        prev_end = e
    return out


def _hidden(model: nn.Module, ids: torch.Tensor, sliding_window: int) -> tuple[torch.Tensor, float]:
    from tuneserve.calibration.calibrate import fresh_context

    p = next(model.parameters())
    t0 = time.perf_counter()
    ctx = fresh_context(model.arch, [ids.numel()], p.device, p.dtype, sliding_window)
    h = model(ids.to(p.device), ctx)
    return h, time.perf_counter() - t0


@torch.inference_mode()
def evaluate(models: dict[str, tuple[nn.Module, int]], token_ids: list[int], window: int = 512,
             stride: int = 512, progress: bool = True) -> list[dict]:
    """models: name -> (model, sliding window or 0). The first entry is the reference for KL and top-1
    (its own KL is 0). Returns one result dict per model, in order."""
    from tuneserve.corpus import eval_windows
    from tuneserve.quant.linear import model_weight_bytes

    scores = {k: Scores(k, model_weight_bytes(m), extra={"sliding_window": sw})
              for k, (m, sw) in models.items()}
    wins = scored_rows(eval_windows(token_ids, window, stride))
    for s, e, first in tqdm(wins, desc="evaluating", unit="window", disable=not progress, leave=False):
        ids = torch.tensor(token_ids[s:e], dtype=torch.long)
        targets = ids[first + 1:]
        hid = {}
        for k, (m, sw) in models.items():
            hid[k], dt = _hidden(m, ids, sw)
            scores[k].seconds += dt
        for r0 in range(first, ids.numel() - 1, ROW_CHUNK):
            r1 = min(ids.numel() - 1, r0 + ROW_CHUNK)
            tgt = targets[r0 - first:r1 - first].unsqueeze(1)
            ref_lp = None
            for k, (m, _) in models.items():
                lp = torch.log_softmax(m.compute_logits(hid[k][r0:r1]).float(), -1)
                ref_lp = lp if ref_lp is None else ref_lp
                sc = scores[k]
                sc.nll -= float(lp.gather(1, tgt.to(lp.device)).sum())
                sc.kl += float((ref_lp.exp() * (ref_lp - lp)).sum())
                sc.agree += int((lp.argmax(-1) == ref_lp.argmax(-1)).sum())
                sc.n += r1 - r0
    return [scores[k].result() for k in models]


def format_table(rows: list[dict], title: str = "") -> str:
    """A plain-text table of evaluation results, with the change in perplexity against the first row."""
    base = rows[0]["perplexity"] if rows else 1.0
    lines = [title] if title else []
    lines.append(f"{'model':28s} {'perplexity':>10s} {'d ppl':>7s} {'KL (nats)':>10s} {'top-1':>7s} "
                 f"{'weight MB':>10s} {'x fp32':>7s}")
    fp32 = rows[0]["weight_bytes"]
    for r in rows:
        lines.append(f"{r['name']:28s} {r['perplexity']:10.3f} {100 * (r['perplexity'] / base - 1):+6.2f}% "
                     f"{r['kl_divergence']:10.4f} {r['top1_agreement']:7.3f} {r['weight_bytes'] / 1e6:10.1f} "
                     f"{r['weight_bytes'] / fp32:7.3f}")
    return "\n".join(lines)
