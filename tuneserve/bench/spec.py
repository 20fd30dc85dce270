"""`tuneserve bench spec`: tokens/s and acceptance with and without speculation, by batch size.

Two workloads: grounded (the answer quotes or edits a passage given in the prompt, where n-gram lookup
shines) and open-ended (stories and explanations, where drafts must be guessed). For each batch size the
same requests run with speculation off and on; the table shows measured speed-up beside the analytic one
that the measured acceptance rate a, the speculation length k and the draft/target cost ratio c predict
(Leviathan et al. 2023): (1 - a^(k+1)) / ((1 - a) (k c + 1)).
"""

from __future__ import annotations

import argparse
import json
import time

from tuneserve.bench.records import table, write_json
from tuneserve.bench.workloads import grounded_prompts, open_prompts
from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import SamplingParams


def analytic_speedup(accept_rate: float, k: float, cost_ratio: float) -> float:
    """Expected speed-up of speculation with per-token acceptance a, k drafts, draft/target cost c."""
    if k <= 0:
        return 1.0
    a = min(accept_rate, 0.999999)
    return (1 - a ** (k + 1)) / ((1 - a) * (k * cost_ratio + 1))


def measure(llm, batches: list[list[list[int]]], output_len: int) -> dict:  # noqa: ANN001
    """Run each batch of prompts in turn to output_len tokens (greedy, EOS ignored); throughput and acceptance
    over all of them."""
    eng = llm.llm_engine
    s0 = eng.get_stats()
    drafts0, dtok0, acc0 = s0.spec_num_drafts, s0.spec_num_draft_tokens, s0.spec_num_accepted_tokens
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    outs, elapsed = [], 0.0
    for prompts in batches:
        t0 = time.perf_counter()
        outs += llm.generate(prompts, params, use_tqdm=False)
        elapsed += time.perf_counter() - t0
    s = eng.get_stats()
    drafts, dtok, acc = s.spec_num_drafts - drafts0, s.spec_num_draft_tokens - dtok0, s.spec_num_accepted_tokens - acc0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tok_s": tokens / elapsed, "elapsed_s": elapsed, "drafts": drafts, "draft_tokens": dtok,
            "accepted_tokens": acc, "acceptance_rate": acc / dtok if dtok else None,
            "mean_acceptance_length": 1 + acc / drafts if drafts else None,
            "mean_k": dtok / drafts if drafts else 0.0, "token_ids": [o.outputs[0].token_ids for o in outs]}


def draft_cost_ratio(llm) -> float:  # noqa: ANN001
    """Draft/target forward time at batch 1 (0 for n-gram lookup, which needs no model)."""
    spec = llm.llm_engine.spec
    if spec is None or spec.draft is None:
        return 0.0
    target = min(llm.llm_engine.runner.time_forward(1) for _ in range(3))
    draft = min(spec.draft.runner.time_forward(1) for _ in range(3))
    return draft / target


def main(ns: argparse.Namespace) -> int:
    from tuneserve.llm import LLM

    args = EngineArgs.from_cli_args(ns)
    spec_cfg = args.speculative_config or ns.spec
    if isinstance(spec_cfg, str):
        spec_cfg = json.loads(spec_cfg)
    base = {**args.to_dict(), "speculative_config": None}
    off = LLM(**base)
    on = LLM(**{**base, "speculative_config": spec_cfg})
    tok = off.get_tokenizer()
    c = draft_cost_ratio(on)
    rows = []
    for workload in ns.workloads.split(","):
        for b in [int(x) for x in ns.batch_sizes.split(",")]:
            rounds = max(1, ns.min_requests // b)  # small batches run several rounds: one prompt is no sample
            prompts = grounded_prompts(tok, b * rounds) if workload == "grounded" else open_prompts(tok, b * rounds)
            batches = [prompts[i:i + b] for i in range(0, len(prompts), b)]
            measure(off, [prompts[:1]], 4)  # warm both engines
            measure(on, [prompts[:1]], 4)
            r_off, r_on = measure(off, batches, ns.output_len), measure(on, batches, ns.output_len)
            rows.append({"workload": workload, "batch": b, "requests": len(prompts), "off_tok_s": r_off["output_tok_s"],
                         "on_tok_s": r_on["output_tok_s"], "speedup": r_on["output_tok_s"] / r_off["output_tok_s"],
                         "acceptance_rate": r_on["acceptance_rate"], "mean_k": r_on["mean_k"],
                         "mean_accept_len": r_on["mean_acceptance_length"],
                         "analytic_speedup": analytic_speedup(r_on["acceptance_rate"] or 0.0, r_on["mean_k"], c),
                         "same_tokens": r_on["token_ids"] == r_off["token_ids"]})
    cols = ["workload", "batch", "requests", "off_tok_s", "on_tok_s", "speedup", "analytic_speedup", "acceptance_rate",
            "mean_k", "mean_accept_len", "same_tokens"]
    print(table(rows, cols, title=f"bench spec: {args.model} ({args.dtype}, quantization {args.quantization}), "
                                  f"speculation {json.dumps(spec_cfg)}, draft/target cost ratio {c:.3f}"))
    write_json(ns.json, {"engine_args": base, "speculative_config": spec_cfg, "draft_cost_ratio": c, "results": rows})
    return 0


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("spec", help="speculative decoding on vs off: tokens/s and acceptance by batch size")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--spec", default='{"method": "ngram", "num_speculative_tokens": 4}',
                   help="speculative config JSON (or use --speculative-config)")
    p.add_argument("--workloads", default="grounded,open")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-requests", type=int, default=4,
                   help="batches smaller than this run in rounds until this many requests are measured")
    p.add_argument("--json")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(bench_main=main)
