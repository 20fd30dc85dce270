"""Quality records for the results file: what a quantization costs in perplexity, KL and top-1.

`tune` needs them when an SLO names `ppl_increase`, `kl` or `top1`; `report` draws them in its precision
table. One record per (model, quantization), kind "quality", measured once with bench/quality.evaluate on
the first QUALITY_TOKENS tokens of the wikipedia corpus (windows of 512, stride 512) against the fp32
model, and skipped when the file already has it.
"""

from __future__ import annotations

import json
import platform
import time

QUALITY_TOKENS = 4096
QUALITY_CORPUS = "wikipedia"
WINDOW = 512


def quality_key(model: str, quantization: str | None) -> str:
    return json.dumps({"kind": "quality", "model": model, "quantization": quantization,
                       "corpus": QUALITY_CORPUS, "tokens": QUALITY_TOKENS}, sort_keys=True)


def measure_quality(model: str, quantizations: list[str | None], max_tokens: int = QUALITY_TOKENS,
                    progress: bool = False) -> dict[str | None, dict]:
    """quantization -> metrics (perplexity, kl_divergence, top1_agreement, weight_bytes) against fp32."""
    import torch

    from tuneserve.bench.quality import evaluate
    from tuneserve.calibration.calibrate import corpus_tokens
    from tuneserve.loading import load_model
    from tuneserve.tokenizer import load_tokenizer
    from tuneserve.weights import open_checkpoint
    from tuneserve.weights.sources import resolve

    path = resolve(model)
    arch = open_checkpoint(path).arch_config()
    cpu = torch.device("cpu")
    entries = {None: (load_model(path, arch, cpu, progress=False), 0)}
    for q in quantizations:
        if q is not None:
            entries[q] = (load_model(path, arch, cpu, progress=False, quantization=q), 0)
    ids = corpus_tokens(load_tokenizer(path), QUALITY_CORPUS, max_tokens)
    rows = evaluate({str(k): v for k, v in entries.items()}, ids, WINDOW, WINDOW, progress=progress)
    return {k: row for k, row in zip(entries, rows)}


def ensure_quality(model: str, quantization: str | None, results: str) -> dict:
    """The quality record of (model, quantization) in `results`, measured and appended when missing.
    The unquantized model's own record (the baseline of ppl_increase) is written alongside."""
    from tuneserve.bench.records import append_record, load_records

    have = {r.get("key"): r for r in load_records(results) if r.get("kind") == "quality"}
    wanted = [None] + ([quantization] if quantization is not None else [])
    missing = [q for q in wanted if quality_key(model, q) not in have]
    if missing:
        measured = measure_quality(model, [q for q in missing if q is not None])
        for q in missing:
            rec = {"key": quality_key(model, q), "kind": "quality", "system": "tuneserve", "model": model,
                   "config": {"quantization": q}, "metrics": measured[q], "corpus": QUALITY_CORPUS,
                   "time": time.time(), "machine": platform.node()}
            append_record(results, rec)
            have[rec["key"]] = rec
    return have[quality_key(model, quantization)]
