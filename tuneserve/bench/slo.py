"""The SLOs `tune` takes: one grammar, clear errors, and each metric's value from the records.

`metric<=bound` or `metric>=bound`, comma-separated. Every metric has one direction and one kind of unit:
  ttft_p99<=2s, tpot_p50<=80ms, e2el_p90<=20s, ttft_mean<=1s   latency over the requests of one run: a
      percentile (p1..p99.9) or the mean; a unit is required (s or ms); the bound must be > 0
  ppl_increase<=2%     perplexity increase against the unquantized model; in %, >= 0 (0%: none allowed)
  kl<=0.05             KL divergence against the unquantized model; no unit, >= 0
  top1>=95%            top-1 agreement with the unquantized model; in %, in (0, 100]
  output_tok_s>=100    output tokens per second; no unit (or tok/s), > 0
  memory_bytes<=1GB    weights + KV cache (weight_bytes: weights alone); B, KB, MB, GB, KiB, MiB or GiB
Latency SLOs are judged on requests arriving at an offered rate (serve mode), never on an offline batch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

LATENCY = ("ttft", "tpot", "e2el")
QUALITY = ("ppl_increase", "kl", "top1")
MIN_TAIL = 2  # a percentile is a percentile, not the maximum, when this many requests lie beyond it
_LAT = re.compile(r"^(ttft|tpot|e2el)_(?:p(\d+(?:\.\d+)?)|(mean))$")
_SLO = re.compile(r"^(?P<metric>[A-Za-z0-9_.]+)\s*(?P<op><=|>=|==|=<|=>|<|>|=)\s*"
                  r"(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>[A-Za-z%/]*)$")
_BYTES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
KNOWN = ("ttft_pNN", "tpot_pNN", "e2el_pNN", "ttft_mean", "tpot_mean", "e2el_mean", "ppl_increase", "kl", "top1",
         "output_tok_s", "memory_bytes", "weight_bytes")


@dataclass(frozen=True)
class SLO:
    """One objective: metric op value, the value in base units (seconds, fractions, bytes, tok/s)."""

    metric: str
    op: str  # "<=" | ">="
    value: float
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"{self.metric}{self.op}{self.value:g}"

    @property
    def kind(self) -> str:
        """latency | quality | throughput | memory."""
        if _LAT.match(self.metric):
            return "latency"
        if self.metric in QUALITY:
            return "quality"
        return "throughput" if self.metric == "output_tok_s" else "memory"

    @property
    def latency(self) -> str | None:
        """Which latency a latency SLO bounds: ttft, tpot or e2el (None for any other SLO)."""
        m = _LAT.match(self.metric)
        return m.group(1) if m else None

    @property
    def percentile(self) -> float | None:
        """The q of a pNN latency SLO (None for a mean or a non-latency SLO)."""
        m = _LAT.match(self.metric)
        return float(m.group(2)) if m and m.group(2) else None

    def met(self, v: float) -> bool:
        return v <= self.value if self.op == "<=" else v >= self.value

    def excess(self, v: float) -> float:
        """How far v misses the bound (0 when met): relative to the bound, absolute when the bound is 0."""
        miss = v - self.value if self.op == "<=" else self.value - v
        return max(0.0, miss / abs(self.value) if self.value else miss)


def _fail(part: str, why: str) -> ValueError:
    return ValueError(f"SLO {part.strip()!r}: {why}")


def parse_slo(part: str) -> SLO:
    """One 'metric<=value[unit]' -> SLO in base units, or ValueError saying what is wrong."""
    text = part.strip()
    if not text:
        raise ValueError("empty SLO (a stray comma?): write e.g. ttft_p99<=2s,tpot_p99<=100ms")
    m = _SLO.match(text)
    if not m:
        raise _fail(part, "write metric<=value or metric>=value with a number, e.g. tpot_p99<=80ms")
    metric, op, num, unit = m.group("metric").lower(), m.group("op"), float(m.group("num")), m.group("unit")
    op = {"=<": "<=", "=>": ">="}.get(op, op)
    if op not in ("<=", ">="):
        raise _fail(part, f"use <= or >= (got {op!r})")
    if not math.isfinite(num):
        raise _fail(part, "the bound must be a finite number")
    lat = _LAT.match(metric)

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise _fail(part, why)

    if lat:
        q = lat.group(2)
        need(q is None or 0 < float(q) < 100, f"a percentile must be in (0, 100), got p{q}")
        need(op == "<=", f"{metric} is a latency: give an upper bound ({metric}<=...)")
        need(unit in ("s", "ms"), f"give the latency's unit, s or ms (e.g. {metric}<={m.group('num')}s)"
             + (f", not {unit!r}" if unit else ""))
        need(num > 0, f"a latency bound must be > 0, got {m.group('num')}{unit}")
        value = num * (1e-3 if unit == "ms" else 1.0)
    elif metric in ("ppl_increase", "top1"):
        need(unit == "%", f"give {metric} in percent (e.g. {metric}{op}{m.group('num')}%)")
        if metric == "ppl_increase":
            need(op == "<=", "ppl_increase is a ceiling: ppl_increase<=N%")
            need(num >= 0, f"ppl_increase must be >= 0% (0%: no increase at all), got {m.group('num')}%")
        else:
            need(op == ">=", "top1 is a floor: top1>=N%")
            need(0 < num <= 100, f"top1 must be in (0%, 100%], got {m.group('num')}%")
        value = num / 100
    elif metric == "kl":
        need(op == "<=" and unit == "", "write kl<=N (no unit): a ceiling on the KL divergence")
        need(num >= 0, f"a KL divergence bound must be >= 0, got {m.group('num')}")
        value = num
    elif metric == "output_tok_s":
        need(op == ">=", "output_tok_s is a floor: output_tok_s>=N")
        need(unit in ("", "tok/s"), f"output_tok_s takes no unit (tokens per second), not {unit!r}")
        need(num > 0, f"a throughput floor must be > 0, got {m.group('num')}")
        value = num
    elif metric in ("memory_bytes", "weight_bytes"):
        need(op == "<=", f"{metric} is a ceiling: {metric}<=N")
        need(unit.lower() in _BYTES, f"{metric} takes B, KB, MB, GB, KiB, MiB or GiB, not {unit!r}")
        need(num > 0, f"a memory ceiling must be > 0, got {m.group('num')}{unit}")
        value = num * _BYTES[unit.lower()]
    else:
        raise _fail(part, f"unknown metric {metric!r}; known: {', '.join(KNOWN)} (NN: a percentile, e.g. p99)")
    return SLO(metric, op, value, text.replace(" ", ""))


def parse_slos(text: str) -> list[SLO]:
    """'ttft_p99<=2s,tpot_p99<=100ms,ppl_increase<=2%' -> SLOs in seconds / fractions / bytes."""
    if not text or not text.strip():
        raise ValueError("no SLO given: write e.g. --slo 'ttft_p99<=2s,tpot_p99<=100ms'")
    return [parse_slo(part) for part in text.split(",")]


def request_values(requests: list[dict], kind: str) -> list[float]:
    """One latency (ttft, tpot or e2el, seconds) of every request that has it."""
    return [r[kind] for r in requests if r.get(kind) is not None]


def latency_value(requests: list[dict], metric: str) -> float | None:
    """A latency metric (ttft_p99, tpot_mean, ...) over the requests of one run (None: no requests)."""
    import numpy as np

    m = _LAT.match(metric)
    vals = request_values(requests, m.group(1))
    if not vals:
        return None
    return float(np.mean(vals)) if m.group(3) else float(np.percentile(vals, float(m.group(2))))


def quality_value(quantization: str | None, metric: str, quality: dict[str, dict]) -> float | None:
    """ppl_increase, kl or top1 of a quantization from quality records (None: not measured)."""
    if quantization in (None, "none"):
        return {"ppl_increase": 0.0, "kl": 0.0, "top1": 1.0}[metric]
    q, base = quality.get(str(quantization)), quality.get("None")
    if metric == "ppl_increase":
        return None if q is None or base is None else q["perplexity"] / base["perplexity"] - 1
    return None if q is None else q["kl_divergence" if metric == "kl" else "top1_agreement"]


def quality_index(records: list[dict], model: str) -> dict[str, dict]:
    """quantization (as str) -> quality metrics, from the 'quality' records of the model."""
    return {str(r["config"].get("quantization")): r["metrics"] for r in records
            if r.get("kind") == "quality" and r.get("model") == model}


def thin_tails(slos: list[SLO], num_requests: int) -> list[str]:
    """Warnings for percentile SLOs that `num_requests` per run cannot measure: fewer than MIN_TAIL requests
    lie beyond the percentile, so it is (nearly) the maximum, and one slow request decides."""
    out = []
    for s in slos:
        q = s.percentile
        if q is not None and num_requests * (1 - q / 100) < MIN_TAIL:
            need = math.ceil(MIN_TAIL / (1 - q / 100) - 1e-9)
            out.append(f"{s.metric} over {num_requests} requests per run is nearly their maximum "
                       f"(fewer than {MIN_TAIL} requests beyond it); send at least {need} per run")
    return out
