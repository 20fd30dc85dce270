"""`tuneserve bench peers`: the engine, HF transformers and llama.cpp on the same prompts, in the same run.

Besides the main corpus workload, `--ladder` adds fixed batches (64 tokens in, 64 out) that every system
runs with all requests started together. Each engine row gets `ratio_vs_best_peer`: its output tok/s over
the fastest peer's on the same workload. A second table measures as llama-bench does (bench/peers/pp_tg.py):
prompt processing alone (pp512) and generation alone at batch 1 and the ladder's batches (tg64), with each
system's ratio to llama.cpp and the fractions of the measured bandwidth and compute limits it reaches
(bench/peers/ceilings.py); `--pp-tg-only` runs just that one. Every system runs on the same number of CPU
threads, --threads (default: torch's count, what the engine uses), and the table and the JSON say how many.
"""

from __future__ import annotations

import sys
from typing import Any

from tuneserve.bench.offline import add_workload_args, run_engine, warm_up
from tuneserve.bench.peers import ceilings, hf, llama_cpp
from tuneserve.bench.peers.pp_tg import PpTgPlan, PpTgRow, add_ratios, engine_pp_tg, merge_rounds
from tuneserve.bench.peers.result import PEERS_INSTALL_HINT, PeerResult, peer_threads
from tuneserve.bench.records import table, torch_threads, write_json
from tuneserve.bench.workloads import corpus_workload, ladder_workload
from tuneserve.engine_args import EngineArgs
from tuneserve.kernels.config import cpu_name

COLUMNS = ["system", "config", "threads", "num_requests", "output_tok_s", "total_tok_s", "mean_ttft_s",
           "mean_tpot_s", "ratio_vs_best_peer"]
PP_TG_COLUMNS = ["system", "test", "batch", "threads", "tok_s", "tok_s_sd", "reps", "vs_llama.cpp", "bw_frac",
                 "compute_frac"]


def _rows(results: list[PeerResult]) -> list[dict[str, Any]]:
    return [{**r.to_dict(), **{k: v for k, v in r.extra.items() if k == "num_requests"}} for r in results]


def peers_table(rows: list[dict[str, Any]], title: str) -> str:
    """The printed comparison, threads included."""
    return table(rows, COLUMNS, title=title)


def main(ns: Any) -> int:
    """`tuneserve bench peers`: the engine, HF transformers and llama.cpp on the same prompts, same run."""
    with torch_threads(peer_threads(ns.threads)) as threads:
        return _compare(ns, threads)


def _compare(ns: Any, threads: int) -> int:
    from tuneserve.llm import LLM

    if ns.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {ns.rounds}")
    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**args.to_dict())
    path = llm.llm_engine.config.model.path
    if not path.endswith(".gguf"):
        raise ValueError("bench peers compares on a GGUF model (llama.cpp reads only GGUF)")
    warm_up(llm)
    ladder = [int(b) for b in ns.ladder.split(",")] if ns.ladder else []
    plan = PpTgPlan(ns.pp, ns.tg, ns.tg_prompt, tuple(ladder) or (1,), ns.reps)
    pp_tg = _pp_tg_rounds(ns, llm, path, plan, threads)
    if ns.pp_tg_only:
        del llm
        return _pp_tg(ns, path, plan, threads, pp_tg, args)
    tok = llm.get_tokenizer()
    work = corpus_workload(tok, ns.corpus, ns.num_prompts, ns.min_input, ns.max_input, ns.output_len,
                           ns.prompt_seed)
    rows: list[dict[str, Any]] = [{**run_engine(llm, work), "config": f"max_num_seqs={args.max_num_seqs}",
                                   "threads": threads}]
    for b in ladder:
        rows.append({**run_engine(llm, ladder_workload(tok, b)), "config": f"ladder batch={b}", "threads": threads})
    del llm
    hf_sizes = [int(b) for b in ns.hf_batch_sizes.split(",") if b]
    if hf_sizes:
        rows += _rows(hf.run_hf(path, work.prompts, work.output_len, hf_sizes, ns.time_limit, threads=threads))
        for b in ladder:
            rows += _rows([_ladder(r, b) for r in hf.run_hf(path, ladder_workload(tok, b).prompts, 64, [b],
                                                            threads=threads)])
    par = [int(b) for b in ns.llama_parallel.split(",") if b]
    if par and llama_cpp.is_available():
        rows += _rows(llama_cpp.run_llama_cpp(path, work.prompts, work.output_len, par, n_threads=threads,
                                              time_limit_s=ns.time_limit))
        for b in ladder:
            ladder_prompts = ladder_workload(tok, b).prompts
            rows += _rows([_ladder(r, b) for r in llama_cpp.run_llama_cpp(path, ladder_prompts, 64, [b],
                                                                            n_threads=threads)])
    elif par:
        print(f"[tuneserve] llama.cpp skipped: {PEERS_INSTALL_HINT}", file=sys.stderr)
    _add_ratios(rows)
    print(peers_table(rows, f"bench peers: {args.model}, workload {work.name}, same run, {threads} threads each"))
    return _pp_tg(ns, path, plan, threads, pp_tg, args, {"workload": work.name, "results": rows})


def _pp_tg_rounds(ns: Any, llm: Any, path: str, plan: PpTgPlan,
                  threads: int) -> tuple[list[PpTgRow], ceilings.Ceilings]:
    """The engine's and the peers' pp/tg rows, the systems taking turns for --rounds rounds (pp_tg.py), and
    the machine's limits measured in every round too (their mean)."""
    with_hf = bool([b for b in ns.hf_batch_sizes.split(",") if b])
    with_llama = bool([b for b in ns.llama_parallel.split(",") if b]) and llama_cpp.is_available()
    rounds, limits = [], []
    for i in range(ns.rounds):
        p = plan.for_round(i)
        rows = engine_pp_tg(llm, p, threads)
        if with_hf:
            rows += hf.hf_pp_tg(path, p, threads)
        if with_llama:
            rows += llama_cpp.llama_pp_tg(path, p, threads)
        rounds.append(rows)
        limits.append(ceilings.measure(threads))
    return merge_rounds(rounds), ceilings.mean(limits)


def _pp_tg(ns: Any, path: str, plan: PpTgPlan, threads: int, pp_tg: tuple[list[PpTgRow], ceilings.Ceilings],
           args: EngineArgs, record: dict | None = None) -> int:
    """The pp/tg table of every system (rows and limits from _pp_tg_rounds): print it, write the JSON record."""
    pp_tg_rows, limits = pp_tg
    out = [r.to_dict() for r in pp_tg_rows]
    add_ratios(out)
    costs = ceilings.gguf_costs(path)
    ceilings.add_fractions(out, costs, limits, plan.pp_len, plan.prompt_len, plan.tg_len)
    print(table(out, PP_TG_COLUMNS, title=f"bench peers, llama-bench style: {args.model}, tok/s, mean of "
                                          f"{plan.reps} runs x {ns.rounds} rounds (systems taking turns), "
                                          f"{threads} threads each, cpu: {cpu_name()}\n"
                                          f"{limits.describe()} (mean of the rounds); bw_frac, compute_frac: "
                                          f"the fraction of each limit a row reaches (bench/peers/ceilings.py)"))
    write_json(ns.json, {"engine_args": args.to_dict(), "threads": threads, "rounds": ns.rounds, "cpu": cpu_name(),
                         **(record or {}),
                         **ceilings.record(costs, limits), "pp_tg": out})
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
    p = sub.add_parser("peers", help="the engine vs HF transformers and llama.cpp on the same prompts")
    p.add_argument("model", nargs="?", default=None)
    add_workload_args(p)
    p.add_argument("--ladder", default="1,8,32", help="fixed batches (64 in, 64 out) to compare too")
    p.add_argument("--hf-batch-sizes", default="1,8,32,64", help="HF batch sizes on the main workload")
    p.add_argument("--llama-parallel", default="1,8,32,64", help="llama.cpp sequences in flight")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of every system (default: torch's count, what the engine uses)")
    p.add_argument("--pp", type=int, default=512, help="prompt length of the pp test (0: none)")
    p.add_argument("--tg", type=int, default=64, help="tokens generated per request in the tg tests")
    p.add_argument("--tg-prompt", type=int, default=64, help="prompt length before the tg tests")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each pp/tg test")
    p.add_argument("--rounds", type=int, default=1,
                   help="pp/tg rounds, the systems taking turns (each round: every system's reps, new prompts)")
    p.add_argument("--pp-tg-only", action="store_true", help="only the llama-bench style table")
    p.add_argument("--time-limit", type=float, default=None,
                   help="per peer config: start no new batch after this many seconds (no extrapolation)")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(bench_main=main)
