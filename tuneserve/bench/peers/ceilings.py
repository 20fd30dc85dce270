"""How far each pp/tg figure is from what the machine allows: bandwidth and compute fractions.

The limits are measured in the same run, on the same threads as the systems:
- bandwidth: a streaming read of a buffer far larger than the caches (torch's sum over 512 MiB of fp32,
  best of several passes), bytes/s;
- compute: an fp32 GEMM (torch.mm, 1024 x 2048 x 2048, best of several), flop/s. It is the ceiling of
  kernels that multiply in fp32, which every system's default path on this file does.
The model's costs come from the GGUF file every system serves:
- bytes per step: every tensor the forward reads (the token embedding only when it is also the tied head);
- matmul parameters: the elements of every matrix a token multiplies (routed experts: top-k of them);
- attention: 4 * layers * heads * head_dim flops and the KV bytes (fp32, the engine's layout) per context token.
A row of B tokens per step at mean context C then needs, per token,
  bytes = bytes_per_step / B + kv_bytes * C   and   flops = 2 * matmul_params + attn_flops * C,
and `bw_frac` = tok/s * bytes / bandwidth, `compute_frac` = tok/s * flops / compute. Batch-1 decode is bound
by bandwidth (read bw_frac), prompts and large batches by compute (read compute_frac).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from tuneserve.bench.records import torch_threads


@dataclass(frozen=True)
class ModelCosts:
    bytes_per_step: int
    matmul_params: int
    attn_flops_per_ctx: int
    kv_bytes_per_ctx: int


@dataclass(frozen=True)
class Ceilings:
    bandwidth: float  # bytes/s
    compute: float  # flop/s
    threads: int

    def describe(self) -> str:
        return (f"limits measured on {self.threads} threads: streaming read {self.bandwidth / 1e9:.1f} GB/s, "
                f"fp32 GEMM {self.compute / 1e9:.0f} GFLOP/s")


def _best(fn: Any, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(threads: int, nbytes: int = 512 << 20, reps: int = 5) -> float:
    """Streaming read bandwidth in bytes/s on `threads` torch threads."""
    import torch

    with torch_threads(threads):
        x = torch.ones(nbytes // 4)
        x.sum()  # touch every page first
        return nbytes / _best(lambda: x.sum(), reps)


def measure_compute(threads: int, m: int = 1024, n: int = 2048, k: int = 2048, reps: int = 5) -> float:
    """fp32 GEMM flop/s on `threads` torch threads."""
    import torch

    with torch_threads(threads):
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)
        return 2 * m * n * k / _best(lambda: torch.mm(a, b, out=out), reps)


def measure(threads: int) -> Ceilings:
    return Ceilings(measure_bandwidth(threads), measure_compute(threads), threads)


def mean(limits: list[Ceilings]) -> Ceilings:
    """The mean of limits measured once per round (bench peers --rounds): a fraction then compares a row's
    mean over the rounds with the machine's mean over them."""
    n = len(limits)
    return Ceilings(sum(c.bandwidth for c in limits) / n, sum(c.compute for c in limits) / n, limits[0].threads)


def gguf_costs(path: str) -> ModelCosts:
    """What one forward step reads and multiplies, from the GGUF file's tensors and metadata."""
    from tuneserve.weights.gguf import GGUFCheckpoint

    ck = GGUFCheckpoint(path)
    arch = ck.arch_config()
    names = set(ck.tensor_names)
    tied = "output.weight" not in names
    read, params = 0, 0
    for t in ck.reader.tensors:
        if t.name == "token_embd.weight" and not tied:
            continue  # a lookup of one row per token, not a read of the matrix
        share = 1.0
        if t.name.endswith("_exps.weight") and arch.num_experts:
            share = arch.num_experts_per_tok / arch.num_experts  # each token reads its top-k experts only
        read += int(t.n_bytes * share)
        if len(t.shape) >= 2 and int(min(t.shape[:2])) > 1:
            params += int(int(t.n_elements) * share)
    attn = 4 * arch.num_layers * arch.num_heads * arch.head_dim
    return ModelCosts(read, params, attn, arch.kv_bytes_per_token)


def add_fractions(rows: list[dict[str, Any]], costs: ModelCosts, limits: Ceilings, pp_len: int,
                  prompt_len: int, tg_len: int) -> None:
    """Give each pp/tg row its bandwidth and compute fractions (see the module docstring)."""
    for r in rows:
        if r["test"].startswith("pp"):
            per_step, ctx = pp_len, pp_len / 2
        else:
            per_step, ctx = r["batch"], prompt_len + tg_len / 2
        nbytes = costs.bytes_per_step / per_step + costs.kv_bytes_per_ctx * ctx
        flops = 2 * costs.matmul_params + costs.attn_flops_per_ctx * ctx
        r["bw_frac"] = r["tok_s"] * nbytes / limits.bandwidth
        r["compute_frac"] = r["tok_s"] * flops / limits.compute


def record(costs: ModelCosts, limits: Ceilings) -> dict[str, Any]:
    return {"model_costs": asdict(costs), "limits": asdict(limits)}
