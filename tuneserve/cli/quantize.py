"""`tuneserve quantize` (write a quantized checkpoint) and `tuneserve eval` (what quantization costs)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tuneserve.engine_args import EngineArgs, auto_quantization
from tuneserve.quant.recipe import AWQ_ROUNDINGS


def _calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization recipe (GPTQ / AWQ calibration)")
    g.add_argument("--group-size", type=int, default=None, help="inputs per scale: 32, 64, 128 (default: the "
                   "largest of 128/64/32 that divides every layer; int8: per output channel)")
    g.add_argument("--symmetric", action="store_true",
                   help="int4 with a fixed zero point (default asymmetric)")
    g.add_argument("--calib-corpus", default=None,
                   help="calibration corpus; several joined by + share the samples "
                        "(default wikipedia+python-docs)")
    g.add_argument("--samples", type=int, default=None, help="calibration windows (default 128)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    g.add_argument("--calib-seed", type=int, default=None, help="seed of the window sampling (default 0)")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in their stored order")
    g.add_argument("--damp", type=float, default=None, help="GPTQ damping, fraction of mean diag(H) (0.01)")
    g.add_argument("--no-clip-search", action="store_true", help="GPTQ/AWQ: no MSE search of group ranges")
    g.add_argument("--awq-rounding", choices=AWQ_ROUNDINGS, default=None,
                   help="AWQ: round the scaled weights with GPTQ's error compensation (default) or to nearest "
                        "(AWQ as published)")
    g.add_argument("--no-embeddings", action="store_true", help="leave the embedding and LM head unquantized")


def _overrides(ns: argparse.Namespace) -> dict:
    out = {"group_size": ns.group_size, "corpus": ns.calib_corpus, "samples": ns.samples,
           "seq_len": ns.seq_len, "seed": ns.calib_seed, "damp": ns.damp,
           "awq_rounding": ns.awq_rounding}
    if ns.symmetric:
        out["symmetric"] = True
    if ns.no_act_order:
        out["act_order"] = False
    if ns.no_clip_search:
        out["clip_search"] = False
    if ns.no_embeddings:
        out["embeddings"] = False
    return out


def cmd_quantize(ns: argparse.Namespace) -> int:
    """Quantize MODEL with a recipe and write the checkpoint directory."""
    import torch

    from tuneserve.loading import load_model, quantize_with_recipe
    from tuneserve.quant.checkpoint import save_quantized
    from tuneserve.quant.linear import model_weight_bytes
    from tuneserve.quant.recipe import parse_quantization
    from tuneserve.tokenizer import load_tokenizer

    name = f"{ns.method}-int{ns.bits}" if ns.method != "rtn" else f"int{ns.bits}"
    spec = parse_quantization(name, **_overrides(ns))
    cfg = EngineArgs(model=ns.model or EngineArgs.model).create_engine_config()
    tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
    model = load_model(cfg.model.path, cfg.model.arch, torch.device(cfg.device), "float32")
    fp32_bytes = model_weight_bytes(model)
    t0 = time.perf_counter()
    report = quantize_with_recipe(model, spec, cfg.model.path, tokenizer=tok)
    spec_d = report.pop("spec")
    meta = {"method": spec_d["method"], "bits": spec_d["bits"], "group_size": spec_d["group_size"],
            "symmetric": spec_d["symmetric"], "recipe": spec_d, "source": str(cfg.model.path),
            "calibration": None if spec_d["method"] == "rtn" else
            {k: spec_d[k] for k in ("corpus", "samples", "seq_len", "seed")},
            "seconds": time.perf_counter() - t0, "weight_bytes": model_weight_bytes(model),
            "fp32_weight_bytes": fp32_bytes, "report": report}
    out = save_quantized(model, ns.out, meta, tok)
    print(f"wrote {out}: {name} g{spec_d['group_size']}, {meta['weight_bytes'] / 1e6:.1f} MB "
          f"({meta['weight_bytes'] / fp32_bytes:.3f} x fp32) in {meta['seconds']:.0f} s")
    if "mean_error_ratio" in report:
        print(f"mean layer output error vs round-to-nearest: {report['mean_error_ratio']:.3f}")
    return 0


def cmd_eval(ns: argparse.Namespace) -> int:
    """Perplexity, KL and top-1 agreement of quantized variants against the unquantized model."""
    import torch

    from tuneserve.bench.quality import evaluate, format_table
    from tuneserve.bench.records import write_json
    from tuneserve.calibration.calibrate import corpus_tokens
    from tuneserve.kernels.config import resolve
    from tuneserve.loading import load_model, quantize_model
    from tuneserve.quant.checkpoint import quant_kind
    from tuneserve.quant.recipe import METHODS
    from tuneserve.tokenizer import load_tokenizer

    args = EngineArgs.from_cli_args(ns)
    wanted = [q for q in (args.quantization or "").split(",") if q and q != "none"]
    args.quantization = None
    cfg = args.create_engine_config()
    path, arch, device = cfg.model.path, cfg.model.arch, torch.device(cfg.device)
    # "auto" (the default) is what serving chooses: a GGUF file's own blocks, else nothing to compare
    quants = [q for q in (auto_quantization(q, Path(path)) for q in wanted) if q]
    if quant_kind(path):  # a quantized checkpoint as MODEL: compare it with the model it came from
        src = json.loads((Path(path) / "quantization.json").read_text()).get("source")
        if not src:
            raise ValueError(f"{path} does not name its source model; pass the source as MODEL and the "
                             "directory as --quantization")
        quants, path = [path, *quants], src
    tok = load_tokenizer(path, cfg.model.tokenizer)
    sw = args.sliding_window or 0
    kernels = resolve(args.kernels, args.quant_activations, args.prompt_attention)
    base = load_model(path, arch, device, "float32", kernels=kernels)
    entries = {"fp32": (base, 0)}
    if sw:
        entries[f"fp32 sliding_window={sw}"] = (base, sw)
    if args.dtype != "float32":
        entries[args.dtype] = (load_model(path, arch, device, args.dtype, kernels=kernels), sw)
    for q in quants:
        m = load_model(path, arch, device, args.dtype, kernels=kernels)
        t0 = time.perf_counter()
        method = q.split(":")[0]  # recipe options may follow: int4:g64
        over = _overrides(ns) if method in METHODS else {}
        if METHODS.get(method, ("", 4))[1] == 8:
            over.pop("group_size", None)  # int8 stays per output channel unless quantized with a recipe
        quantize_model(m, q, checkpoint_path=path, kernels=kernels, **over)
        label = q if len(q) < 28 else "..." + q[-25:]
        entries[label + (f" sw={sw}" if sw else "")] = (m, sw)
        print(f"[tuneserve] {q}: ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    ids = corpus_tokens(tok, ns.corpus, ns.max_tokens)
    rows = evaluate(entries, ids, ns.window, ns.stride)
    title = (f"eval {args.model} on {ns.corpus!r}: {len(ids)} tokens, windows of {ns.window}, "
             f"stride {ns.stride}; KL and top-1 against fp32 (full attention)")
    print(format_table(rows, title))
    write_json(ns.json, {"model": args.model, "corpus": ns.corpus, "tokens": len(ids), "window": ns.window,
                         "stride": ns.stride, "results": rows})
    return 0


def add_parsers(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    """Register the `quantize` and `eval` verbs."""
    p = sub.add_parser("quantize", help="quantize a model (RTN, GPTQ, AWQ) and write a checkpoint directory")
    p.add_argument("model", nargs="?", default=None, help="built-in alias, GGUF file or HF model directory")
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default="gptq")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--out", required=True,
                   help="output directory (load it with quantization=DIR or model=DIR)")
    _calibration_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement vs the unquantized model")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--corpus", default="wikipedia", help="built-in corpus name or a text file")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--stride", type=int, default=512, help="step between windows (<= window)")
    p.add_argument("--max-tokens", type=int, default=16384, help="score the corpus's first N tokens")
    p.add_argument("--json", default=None, help="write the results here")
    _calibration_args(p)
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(func=cmd_eval)
