"""Performance peers measured on the engine's own workload: HF transformers `generate` and llama.cpp.

The workload is the one the engine is benchmarked on: a list of prompts given as token-id lists, a fixed
number of new tokens per request, greedy decoding, EOS ignored. Both peers run in this process, so run
them on a quiet machine and in the same session as the engine (see shared/ANCHORS.md: with 2 cores any
other busy process slows torch several-fold).

Definitions (the same for both peers, so their numbers compare):
- output_tok_s: generated tokens of the requests that ran / wall time of the whole workload.
- total_tok_s: (prompt + generated tokens) / the same wall time.
- TTFT of a request: time from the start of the workload until its first generated token (queueing
  included, as a client that submitted every request at time 0 would see it).
- TPOT of a request: (time of its last token - time of its first token) / (output tokens - 1).
- peak_rss_bytes: the process's maximum resident set size so far (`getrusage`); it never decreases, so
  for the second and later configs of a run it is an upper bound, not that config's own peak.
- threads: the CPU threads the peer computed on; by default the engine's own count (torch's intra-op
  threads, `peer_threads`), so that no system gets more cores than another.

`time_limit_s` never extrapolates: once it is exceeded no new batch (HF) or request (llama.cpp) is
started (the first batch / the first n_parallel requests always start), work already started is
finished, and every number is over the requests that ran; `extra["num_requests"]` says how many.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tuneserve.resources import peak_rss_bytes

PEERS_INSTALL_HINT = (
    "llama.cpp peer needs llama-cpp-python: `pip install -e .[peers]` "
    "(it compiles llama.cpp, about 9 minutes on 2 cores)"
)


@dataclass
class PeerResult:
    """Throughput and latency of one peer system under one configuration, over one workload."""

    system: str
    config: str
    output_tokens: int
    prompt_tokens: int
    elapsed_s: float
    output_tok_s: float
    total_tok_s: float
    mean_ttft_s: float | None
    mean_tpot_s: float | None
    peak_rss_bytes: int | None
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-serializable dict."""
        return asdict(self)


def peer_threads(threads: int | None = None) -> int:
    """The threads a peer runs on: `threads`, else the engine's count (torch's intra-op threads)."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads) if threads is not None else torch.get_num_threads()


def mean(values: Sequence[float]) -> float | None:
    """Return the arithmetic mean, or None for an empty sequence."""
    return sum(values) / len(values) if values else None


def check_workload(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Reject workloads no peer can run."""
    if not prompts:
        raise ValueError("empty workload: no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def make_result(
    system: str,
    config: str,
    prompt_lens: Sequence[int],
    out_lens: Sequence[int],
    elapsed: float,
    ttfts: Sequence[float],
    tpots: Sequence[float],
    extra: dict[str, Any],
    threads: int | None = None,
) -> PeerResult:
    """Assemble a PeerResult from per-request measurements."""
    out_tokens = int(sum(out_lens))
    prompt_tokens = int(sum(prompt_lens))
    elapsed = max(elapsed, 1e-9)
    extra = {"num_requests": len(out_lens), **extra}
    return PeerResult(
        system=system,
        config=config,
        output_tokens=out_tokens,
        prompt_tokens=prompt_tokens,
        elapsed_s=elapsed,
        output_tok_s=out_tokens / elapsed,
        total_tok_s=(out_tokens + prompt_tokens) / elapsed,
        mean_ttft_s=mean(ttfts),
        mean_tpot_s=mean(tpots),
        peak_rss_bytes=peak_rss_bytes(),
        threads=threads,
        extra=extra,
    )
