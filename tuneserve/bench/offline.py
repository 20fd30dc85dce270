"""`tuneserve bench offline`: the engine's offline throughput and latency on a corpus workload.

Default workload (the core issue's): 64 requests, prompts of 64-512 tokens cut from Wikipedia text,
128 output tokens each, greedy, EOS ignored. `--ladder 1,8,32` adds fixed-batch runs (64-token prompts,
64 new tokens), the shape of shared/ANCHORS.md's peer table.
"""

from __future__ import annotations

import argparse
import json
import time

from tuneserve.bench.records import percentile, table, write_json
from tuneserve.bench.workloads import Workload, corpus_workload, ladder_workload, schema_of
from tuneserve.engine_args import EngineArgs
from tuneserve.resources import peak_rss_bytes
from tuneserve.sampling_params import SamplingParams, StructuredOutputsParams


def run_engine(llm, work: Workload, label: str = "tuneserve",  # noqa: ANN001 - tuneserve.LLM
               structured: StructuredOutputsParams | None = None, temperature: float = 0.0,
               lengths: list[int] | None = None) -> dict:
    """Run a workload through an LLM (every request constrained by `structured` when given; request i
    seeded with i, and producing lengths[i] tokens when given); returns throughput and latency figures,
    and the share of the step spent on grammar masks."""
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=lengths[i] if lengths else work.output_len,
                             ignore_eos=True, structured_outputs=structured) for i in range(len(work.prompts))]
    eng = llm.llm_engine
    preempt0, hits0, queries0 = eng.scheduler.num_preemptions, eng.kv.prefix_hits, eng.kv.prefix_queries
    s0 = eng.get_stats()
    step0, mask0, reduce0 = s0.step_seconds, s0.structured_mask_seconds, s0.all_reduce_seconds
    t0 = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = [o.metrics.ttft for o in outs]
    tpots = [o.metrics.tpot for o in outs if o.metrics.tpot is not None]
    e2els = [o.metrics.e2e for o in outs]
    s1 = eng.get_stats()
    texts = [o.outputs[0].text for o in outs]
    return {
        "lengths": [len(o.outputs[0].token_ids) for o in outs],
        "mask_share": (s1.structured_mask_seconds - mask0) / max(1e-9, s1.step_seconds - step0),
        "all_reduce_share": (s1.all_reduce_seconds - reduce0) / max(1e-9, s1.step_seconds - step0),
        "system": label,
        "workload": work.name,
        "num_requests": len(outs),
        "prompt_tokens": work.prompt_tokens,
        "output_tokens": out_tok,
        "elapsed_s": elapsed,
        "output_tok_s": out_tok / elapsed,
        "total_tok_s": (out_tok + work.prompt_tokens) / elapsed,
        "mean_ttft_s": sum(ttfts) / len(ttfts),
        "mean_tpot_s": sum(tpots) / len(tpots) if tpots else None,
        "decode_tok_s_per_seq": (len(tpots) / sum(tpots)) if tpots else None,
        "preemptions": eng.scheduler.num_preemptions - preempt0,
        "prefix_hit_rate": ((eng.kv.prefix_hits - hits0) / max(1, eng.kv.prefix_queries - queries0)),
        "peak_rss_bytes": peak_rss_bytes(),
        **({"texts": texts} if structured is not None else {}),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50), "tpot_p99_s": percentile(tpots, 99),
        "e2el_p50_s": percentile(e2els, 50), "e2el_p99_s": percentile(e2els, 99),
        "requests": [{"ttft": a, "tpot": b, "e2el": c} for a, b, c in
                     zip(ttfts, [o.metrics.tpot for o in outs], e2els)],
    }


def structure_cost(llm, work: Workload, schema: dict, temperature: float, max_num_seqs: int,  # noqa: ANN001
                   compare: bool = True) -> list[dict]:
    """The same workload with every request constrained to `schema`, then (compare) unconstrained with the
    same output lengths (a grammar ends requests early; equal lengths keep the batch the same): the
    throughput ratio, the mask share of the step, and how many outputs are valid against the schema."""
    rows = []
    for constrained in (True, False)[:2 if compare else 1]:
        llm.llm_engine.kv.reset_prefix_cache()  # as cold as the first run
        row = run_engine(llm, work, structured=StructuredOutputsParams(json=schema) if constrained else None,
                         temperature=temperature, lengths=rows[0]["lengths"] if rows else None)
        row["config"] = f"max_num_seqs={max_num_seqs} " + ("json-schema" if constrained else "same lengths")
        rows.append(row)
    texts = rows[0].pop("texts")
    rows[0]["valid"] = sum(_valid(t, schema) for t in texts) / len(texts)
    rows[0]["num_valid"] = sum(_valid(t, schema) for t in texts)
    if compare:
        rows[0]["vs_unconstrained"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    return rows


def _valid(text: str, schema: dict) -> bool:
    """Whether text is JSON valid against schema (jsonschema, the test extra; without it: JSON at all)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    try:
        import jsonschema
    except ImportError:
        return True
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def run_ladder(llm, batches: list[int], label: str = "tuneserve") -> list[dict]:  # noqa: ANN001
    """Fixed-batch runs: all requests start together, as the peers' batch numbers are measured."""
    rows = []
    for b in batches:
        r = run_engine(llm, ladder_workload(llm.get_tokenizer(), b), label)
        r["config"] = f"batch={b}"
        rows.append(r)
    return rows


def warm_up(llm) -> None:  # noqa: ANN001
    llm.generate([[1] * 64, [2] * 16], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                 use_tqdm=False)
    llm.llm_engine.kv.reset_prefix_cache()


def main(ns: argparse.Namespace) -> int:
    from tuneserve.llm import LLM

    if ns.validity_only and not ns.json_schema:
        raise SystemExit("--validity-only needs --json-schema")
    args = EngineArgs.from_cli_args(ns)
    llm = LLM(**args.to_dict())
    warm_up(llm)
    work = corpus_workload(llm.get_tokenizer(), ns.corpus, ns.num_prompts, ns.min_input, ns.max_input,
                           ns.output_len, ns.prompt_seed)
    rows = []
    if not ns.validity_only:
        main_row = run_engine(llm, work, temperature=ns.temperature)
        rows = [{**main_row, "config": f"max_num_seqs={args.max_num_seqs}"}]
    if ns.json_schema:
        rows += structure_cost(llm, work, schema_of(ns.json_schema), ns.temperature, args.max_num_seqs,
                               compare=not ns.validity_only)
    rows += run_ladder(llm, [int(b) for b in ns.ladder.split(",")] if ns.ladder else [])
    cols = ["system", "config", "workload", "output_tok_s", "total_tok_s", "mean_ttft_s", "mean_tpot_s",
            "preemptions", "peak_rss_bytes"]
    cols += ["mask_share", "valid", "num_valid", "vs_unconstrained"] if ns.json_schema else []
    cols += ["all_reduce_share"] if args.tensor_parallel_size > 1 else []
    cfg = llm.llm_engine.config  # resolved: "auto" is what it chose, "none" is None
    print(table(rows, cols, title=f"bench offline: {args.model} ({args.dtype}, quantization "
                                  f"{cfg.model.quantization or 'none'})"))
    note = bf16_note(cfg.model.dtype, cfg.model.quantization, cfg.device)
    if note:
        print(note)
    write_json(ns.json, {"engine_args": args.to_dict(), "results": rows, "note": note})
    return 0


def bf16_note(dtype: str, quantization: str | None, device: str) -> str | None:
    """Say whether bf16 arithmetic in this run is native or emulated by PyTorch on this CPU."""
    if device != "cpu" or (dtype == "float32" and quantization is None):
        return None
    from tuneserve.kernels.quant_ops import native_bf16

    if native_bf16():
        return ("note: this CPU multiplies bf16 natively (AVX512-BF16/AMX): bf16 GEMMs run ~3x fp32 here, and "
                "quantized layers at batch >= 16 multiply bf16 tiles")
    return ("note: this CPU has no native bf16: PyTorch emulates bf16 matmuls, slower than fp32; quantized "
            "layers compute in fp32")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-input", type=int, default=64)
    p.add_argument("--max-input", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--corpus", default="wikipedia", help="built-in corpus name or a text file")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the prompt sampling")
    p.add_argument("--json", help="write results here")


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("offline", help="offline throughput/latency of the engine on a corpus workload")
    p.add_argument("model", nargs="?", default=None)
    add_workload_args(p)
    p.add_argument("--ladder", default="", help="also run fixed batches, e.g. 1,8,32 (64 in, 64 out)")
    p.add_argument("--json-schema", default=None, metavar="FILE|demo",
                   help="also run the workload with every request constrained to this JSON schema "
                        "('demo': 20 properties), then unconstrained with the same output lengths, and report "
                        "the throughput ratio, the mask share of the step and the share of valid outputs")
    p.add_argument("--validity-only", action="store_true",
                   help="with --json-schema: only the constrained run, for the share of valid outputs")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (request i seeded with i)")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(bench_main=main)
