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

`time_limit_s` never extrapolates: once it is exceeded no new batch (HF) or request (llama.cpp) is
started (the first batch / the first n_parallel requests always start), work already started is
finished, and every number is over the requests that ran; `extra["num_requests"]` says how many.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

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
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-serializable dict."""
        return asdict(self)


def _peak_rss_bytes() -> int:
    """Return this process's maximum resident set size in bytes."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _mean(values: Sequence[float]) -> float | None:
    """Return the arithmetic mean, or None for an empty sequence."""
    return sum(values) / len(values) if values else None


def _check_workload(prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Reject workloads no peer can run."""
    if not prompts:
        raise ValueError("empty workload: no prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _make_result(
    system: str,
    config: str,
    prompt_lens: Sequence[int],
    out_lens: Sequence[int],
    elapsed: float,
    ttfts: Sequence[float],
    tpots: Sequence[float],
    extra: dict[str, Any],
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
        mean_ttft_s=_mean(ttfts),
        mean_tpot_s=_mean(tpots),
        peak_rss_bytes=_peak_rss_bytes(),
        extra=extra,
    )




# ----------------------------------------------------------------------------------- bench peers CLI


def _rows(results: list[PeerResult]) -> list[dict[str, Any]]:
    return [{**r.to_dict(), **{k: v for k, v in r.extra.items() if k == "num_requests"}} for r in results]


def main(ns: Any) -> int:
    """`tuneserve bench peers`: the engine, HF transformers and llama.cpp on the same prompts, same run."""
    from tuneserve.bench import peer_hf, peer_llama_cpp
    from tuneserve.bench.offline import corpus_workload, ladder_workload, run_engine, warm_up
    from tuneserve.bench.report import table, write_json
    from tuneserve.engine_args import EngineArgs
    from tuneserve.llm import LLM

    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**args.to_dict())
    path = llm.llm_engine.config.model.path
    if not path.endswith(".gguf"):
        raise ValueError("bench peers compares on a GGUF model (llama.cpp reads only GGUF)")
    warm_up(llm)
    tok = llm.get_tokenizer()
    work = corpus_workload(tok, ns.corpus, ns.num_prompts, ns.min_input, ns.max_input, ns.output_len,
                           ns.prompt_seed)
    ladder = [int(b) for b in ns.ladder.split(",")] if ns.ladder else []
    rows: list[dict[str, Any]] = [{**run_engine(llm, work), "config": f"max_num_seqs={args.max_num_seqs}"}]
    for b in ladder:
        rows.append({**run_engine(llm, ladder_workload(tok, b)), "config": f"ladder batch={b}"})
    del llm
    hf_sizes = [int(b) for b in ns.hf_batch_sizes.split(",") if b]
    if hf_sizes:
        rows += _rows(peer_hf.run_hf(path, work.prompts, work.output_len, hf_sizes, ns.time_limit))
        for b in ladder:
            rows += _rows([_ladder(r, b) for r in peer_hf.run_hf(path, ladder_workload(tok, b).prompts, 64, [b])])
    par = [int(b) for b in ns.llama_parallel.split(",") if b]
    if par and peer_llama_cpp.is_available():
        rows += _rows(peer_llama_cpp.run_llama_cpp(path, work.prompts, work.output_len, par,
                                                   time_limit_s=ns.time_limit))
        for b in ladder:
            rows += _rows([_ladder(r, b) for r in
                           peer_llama_cpp.run_llama_cpp(path, ladder_workload(tok, b).prompts, 64, [b])])
    elif par:
        print(f"[tuneserve] llama.cpp skipped: {PEERS_INSTALL_HINT}", file=sys.stderr)
    _add_ratios(rows)
    cols = ["system", "config", "num_requests", "output_tok_s", "total_tok_s", "mean_ttft_s", "mean_tpot_s",
            "ratio_vs_best_peer"]
    print(table(rows, cols, title=f"bench peers: {args.model}, workload {work.name}, same run"))
    write_json(ns.json, {"engine_args": args.to_dict(), "workload": work.name, "results": rows})
    return 0


def _ladder(r: PeerResult, b: int) -> PeerResult:
    r.config = f"ladder batch={b}"
    return r


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each tuneserve row's output tok/s over the best peer's on the same workload (same config group)."""
    def group(r: dict) -> str:
        return r["config"] if r["config"].startswith("ladder") else "main"

    best: dict[str, float] = {}
    for r in rows:
        if r["system"] != "tuneserve":
            best[group(r)] = max(best.get(group(r), 0.0), r["output_tok_s"])
    for r in rows:
        if r["system"] == "tuneserve" and group(r) in best:
            r["ratio_vs_best_peer"] = r["output_tok_s"] / best[group(r)]


def add_parser(sub: Any) -> None:
    from tuneserve.bench.offline import add_workload_args
    from tuneserve.engine_args import EngineArgs

    p = sub.add_parser("peers", help="the engine vs HF transformers and llama.cpp on the same prompts")
    p.add_argument("model", nargs="?", default=None)
    add_workload_args(p)
    p.add_argument("--ladder", default="1,8,32", help="fixed batches (64 in, 64 out) to compare too")
    p.add_argument("--hf-batch-sizes", default="1,8,32,64", help="HF batch sizes on the main workload")
    p.add_argument("--llama-parallel", default="1,8,32,64", help="llama.cpp sequences in flight")
    p.add_argument("--time-limit", type=float, default=None,
                   help="per peer config: start no new batch after this many seconds (no extrapolation)")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(bench_main=main)
