"""`tuneserve bench context`: what a longer context costs, with full attention and with sliding windows.

For each context length N: the prefill time of an N-token prompt (one request, the engine's chunked
prefill), the decode time per token right after it, and the KV bytes the request holds (blocks held per
KV group x bytes per block) against what full attention on every layer would hold. Modes: `full` (every
layer attends to everything), `window W` (`--sliding-window W` imposed, with sink tokens; lossy), and for
models trained with windows (Gemma 3) `native`, plus `full` made by dropping the windows (`--compare-full`;
its output is not the model's, only its cost is of interest). Prefill times are fitted to
cost(N) = a*N + b*N^2; the report gives cost(32k)/cost(8k) from the fit (measured too where both ran)
and the N where the quadratic term overtakes the linear one (b*N^2 = a*N at N = a/b).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from tuneserve.bench.records import table, write_json
from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import SamplingParams

DEFAULT_LENGTHS = "512,1024,2048,4096,8192"


def kv_bytes_held(engine, req) -> tuple[int, int]:  # noqa: ANN001 - LLMEngine, Request
    """(KV bytes req holds now, bytes full attention on every layer would hold for its computed tokens)."""
    block_bytes = engine.kv_block_bytes()
    held = sum(engine.kv.num_held_blocks(req, g) * b for g, b in enumerate(block_bytes))
    blocks = -(-req.num_computed_tokens // engine.config.cache.block_size)
    return held, blocks * sum(block_bytes)


def make_engine(args: EngineArgs, drop_windows: bool = False):  # noqa: ANN201 - LLMEngine
    """An engine for args; drop_windows removes the model's own sliding windows (full attention)."""
    from tuneserve.engine.llm_engine import LLMEngine

    config = args.create_engine_config()
    if drop_windows:
        m = config.model
        config = dataclasses.replace(config, model=dataclasses.replace(
            m, arch=dataclasses.replace(m.arch, layer_windows=())))
    return LLMEngine(config)


def measure(engine, prompt: list[int], decode_tokens: int, clock=time.perf_counter) -> dict:  # noqa: ANN001
    """Prefill and decode timings (by `clock`) and KV bytes of one request run alone."""
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    t0 = clock()
    rid = engine.add_request(None, prompt, params)
    req = engine.requests[rid]
    t_first = None
    kv_peak = kv_full = 0
    while engine.has_unfinished_requests():
        engine.step()
        if req.num_output_tokens and t_first is None:
            t_first = clock()
        if not req.is_finished:
            held, full = kv_bytes_held(engine, req)
            if held > kv_peak:
                kv_peak, kv_full = held, full
    t_end = clock()
    return {
        "prompt_tokens": len(prompt),
        "prefill_s": t_first - t0,
        "prefill_tok_s": len(prompt) / (t_first - t0),
        "decode_ms_per_tok": 1000 * (t_end - t_first) / max(1, decode_tokens - 1),
        "kv_mib": kv_peak / 2**20,
        "kv_full_mib": kv_full / 2**20,
        "kv_ratio": kv_peak / kv_full if kv_full else None,
    }


def fit_cost(ns: list[int], seconds: list[float]) -> dict:
    """Least-squares cost(N) = a*N + b*N^2 over the measured points, and what it implies."""
    x = np.asarray(ns, dtype=np.float64)
    (a, b), *_ = np.linalg.lstsq(np.stack([x, x * x], axis=1), np.asarray(seconds), rcond=None)

    def cost(n: float) -> float:
        return float(a * n + b * n * n)

    quadratic = b > 0 and a > 0 and b * x.max() > 1e-3 * a  # else: no quadratic term to speak of
    return {"a": float(a), "b": float(b), "crossover_n": float(a / b) if quadratic else None,
            "fit_ratio_32k_8k": cost(32768) / cost(8192) if cost(8192) > 0 else None}


def run_mode(engine, label: str, prompts: dict[int, list[int]], decode_tokens: int,  # noqa: ANN001
             repeats: int = 1, clock=time.perf_counter) -> list[dict]:  # noqa: ANN001
    """Every length through one engine (the fastest of `repeats` runs each); prints a line per length."""
    rows = []
    for n, prompt in prompts.items():
        runs = [measure(engine, prompt, decode_tokens, clock) for _ in range(repeats)]
        best = min(runs, key=lambda r: r["prefill_s"])
        best["decode_ms_per_tok"] = min(r["decode_ms_per_tok"] for r in runs)
        row = {"mode": label, "context": n, **best}
        print(f"  {label:>14s} N={n:>6,}: prefill {row['prefill_s']:.2f}s, decode "
              f"{row['decode_ms_per_tok']:.1f} ms/tok, KV {row['kv_mib']:.1f} MiB "
              f"({100 * (row['kv_ratio'] or 0):.0f}% of full)", flush=True)
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per mode: the fitted cost curve, its 32k/8k ratio and the measured one where both lengths ran."""
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        s = {"mode": mode, **fit_cost([r["prompt_tokens"] for r in mine], [r["prefill_s"] for r in mine])}
        by_len = {r["context"]: r["prefill_s"] for r in mine}
        s["measured_ratio_32k_8k"] = by_len[32768] / by_len[8192] if {8192, 32768} <= set(by_len) else None
        out.append(s)
    return out


def plot(rows: list[dict], fits: list[dict], path: Path, title: str) -> None:
    """Prefill time (with the fit), decode time per token and KV MiB against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for fit in fits:
        mine = [r for r in rows if r["mode"] == fit["mode"]]
        ns = np.array([r["prompt_tokens"] for r in mine])
        line = axes[0].plot(ns, [r["prefill_s"] for r in mine], "o", label=fit["mode"])[0]
        grid = np.linspace(0, ns.max(), 100)
        axes[0].plot(grid, fit["a"] * grid + fit["b"] * grid**2, "--", color=line.get_color(), linewidth=1)
        axes[1].plot(ns, [r["decode_ms_per_tok"] for r in mine], "o-", label=fit["mode"])
        axes[2].plot(ns, [r["kv_mib"] for r in mine], "o-", label=fit["mode"])
    full = sorted({r["prompt_tokens"]: r["kv_full_mib"] for r in rows}.items())  # the same for every mode
    axes[2].plot([n for n, _ in full], [m for _, m in full], "k:", label="full attention, every layer")
    for ax, ylabel in zip(axes, ["prefill seconds (fit a*N + b*N^2 dashed)", "decode ms per token",
                                 "KV MiB held by the request"]):
        ax.set_xlabel("context tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def context_prompts(tokenizer, lengths: list[int], limit: int, seed: int = 0) -> dict[int, list[int]]:  # noqa: ANN001
    """One Wikipedia prompt per length (cut to fit the model's context with the decode tokens)."""
    from tuneserve.corpus import load_corpus, sample_prompts

    text = load_corpus("wikipedia")
    longest = sample_prompts(tokenizer, text, 1, min(max(lengths), limit), min(max(lengths), limit), seed)[0]
    return {n: longest[:min(n, limit)] for n in lengths}


def main(ns: argparse.Namespace) -> int:
    import torch

    if ns.threads:
        torch.set_num_threads(ns.threads)
    clock = time.process_time if ns.clock == "cpu" else time.perf_counter
    args = EngineArgs.from_cli_args(ns)
    lengths = sorted({int(x) for x in ns.lengths.split(",")})
    window = args.sliding_window
    args.sliding_window = None
    args.enable_prefix_caching = False  # each length must compute its whole prompt
    args.max_num_seqs = 1
    modes = []
    probe = args.create_engine_config().model
    native = bool(probe.arch.layer_windows)
    context = probe.arch.max_position_embeddings
    limit = context - ns.decode_tokens
    args.max_model_len = min(context, max(lengths) + ns.decode_tokens)
    full_bytes = 2 * probe.arch.num_layers * probe.arch.num_kv_heads * probe.arch.head_dim * 4
    if args.kv_cache_memory_bytes is None:  # room for the longest request with full attention, + 1/8
        args.kv_cache_memory_bytes = int(full_bytes * (args.max_model_len + 64) * 1.125)
    modes.append(("native" if native else "full", dataclasses.replace(args), False))
    if native and ns.compare_full:
        modes.append(("full", dataclasses.replace(args), True))
    if window:
        modes.append((f"window {window}", dataclasses.replace(args, sliding_window=window), False))
    rows: list[dict] = []
    for label, margs, drop in modes:
        print(f"bench context: {margs.model} [{label}]", flush=True)
        engine = make_engine(margs, drop_windows=drop)
        engine.add_request(None, [1] * 64, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        while engine.has_unfinished_requests():
            engine.step()
        mode_lengths = [n for n in lengths if not (drop and ns.full_max_length and n > ns.full_max_length)]
        prompts = context_prompts(engine.tokenizer, mode_lengths, limit)
        rows += run_mode(engine, label, prompts, ns.decode_tokens, ns.repeats, clock)
        del engine
    fits = summarize(rows)
    cols = ["mode", "context", "prompt_tokens", "prefill_s", "prefill_tok_s", "decode_ms_per_tok", "kv_mib",
            "kv_full_mib", "kv_ratio"]
    print(table(rows, cols, title=f"bench context: {args.model} ({args.dtype}, block {args.block_size}, "
                                  f"prefill chunks of {args.max_num_batched_tokens or 512}, {ns.clock} "
                                  f"seconds, {torch.get_num_threads()} torch threads)"))
    print(table(fits, ["mode", "a", "b", "crossover_n", "fit_ratio_32k_8k", "measured_ratio_32k_8k"],
                title="prefill cost fit: cost(N) = a*N + b*N^2 seconds; crossover_n: b*N^2 = a*N"))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "context.json", {"engine_args": args.to_dict(), "decode_tokens": ns.decode_tokens,
                                      "clock": ns.clock, "torch_threads": torch.get_num_threads(),
                                      "results": rows, "fits": fits})
    plot(rows, fits, out / "context.png", f"context cost: {args.model}")
    print(f"wrote {out / 'context.json'} and {out / 'context.png'}")
    if ns.results:
        append_context_records(ns.results, args.model, rows)
    return 0


def append_context_records(results: str, model: str, rows: list[dict]) -> None:
    """Add one 'context' record per measured length to a sweep results file, for `tuneserve report`."""
    from tuneserve.bench.records import append_record

    for r in rows:
        metrics = {"context": r["context"], "prefill_s": r["prefill_s"],
                   "decode_s_per_token": r["decode_ms_per_tok"] / 1000.0, "kv_bytes": r["kv_mib"] * 2**20}
        append_record(results, {"kind": "context", "system": "tuneserve", "model": model,
                                "config": {"attention": r["mode"]}, "metrics": metrics})


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("context", help="prefill/decode time and KV memory across context lengths")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"context lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated after each prompt")
    p.add_argument("--repeats", type=int, default=1, help="runs per length; the fastest counts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine)")
    p.add_argument("--compare-full", action=argparse.BooleanOptionalAction, default=True,
                   help="for models with sliding windows, also run with the windows removed")
    p.add_argument("--full-max-length", type=int, default=0,
                   help="skip lengths above this in the windows-removed run (0: no limit)")
    p.add_argument("--results", default=None, help="also append the rows to this sweep JSONL (for `report`)")
    p.add_argument("--out", default="bench-context", help="directory for context.json and context.png")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(bench_main=main)
