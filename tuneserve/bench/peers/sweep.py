"""Peer points for a sweep: HF transformers and llama.cpp on the sweep's workload, where installed."""

from __future__ import annotations

import sys
import time

from tuneserve.bench.peers import hf, llama_cpp
from tuneserve.bench.peers.result import peer_threads
from tuneserve.bench.records import append_record, load_records, point_key
from tuneserve.bench.workloads import build_workload


def sweep_peers(model: str, workload: str, out: str, num_prompts: int, output_len: int,
                batch_sizes: tuple[int, ...] = (1, 8, 32), threads: int | None = None) -> None:
    """Append peer records (skipping those already in `out`) for a GGUF model; every peer runs on `threads`
    (default: the engine's count) and its record says how many."""
    from tuneserve.tokenizer import load_tokenizer
    from tuneserve.weights.sources import resolve

    path = str(resolve(model))
    if not path.endswith(".gguf"):
        print("[tuneserve] peers need a GGUF model; skipped", file=sys.stderr)
        return
    work = build_workload(load_tokenizer(path), workload, num_prompts, output_len)
    done = {r.get("key") for r in load_records(out)}
    threads = peer_threads(threads)
    runners = {"hf": lambda b: hf.run_hf(path, work.prompts, output_len, [b], threads=threads)}
    if llama_cpp.is_available():
        runners["llama.cpp"] = lambda b: llama_cpp.run_llama_cpp(path, work.prompts, output_len, [b],
                                                                 n_threads=threads)
    for system, run in runners.items():
        for b in batch_sizes:
            point = {"max_num_seqs": b}
            key = point_key(model, workload, "offline", None, point, system)
            if key in done:
                continue
            (res,) = run(b)
            metrics = {"output_tok_s": res.output_tok_s, "total_tok_s": res.total_tok_s,
                       "mean_ttft_s": res.mean_ttft_s, "mean_tpot_s": res.mean_tpot_s,
                       "tpot_p50_s": res.mean_tpot_s, "elapsed_s": res.elapsed_s,
                       "num_requests": res.extra.get("num_requests"), "peak_rss_bytes": res.peak_rss_bytes,
                       "threads": res.threads}
            append_record(out, {"key": key, "kind": "offline", "system": system, "model": model,
                                "workload": workload, "mode": "offline", "rate": None, "config": point,
                                "num_prompts": num_prompts, "output_len": output_len,
                                "metrics": metrics, "time": time.time()})
