"""The README's AWQ recovery figures: the share of RTN's perplexity loss that quantized checkpoints win back.

Recovery = (NLL_rtn - NLL_ckpt) / (NLL_rtn - NLL_fp32) over the same 512-token windows (stride 512) that
`tuneserve eval` scores, on Wikipedia and the Python docs, for the first 8 windows and for all of them, with a
standard error from 500 bootstrap resamples of the windows. The README quotes, for Qwen2.5-Coder-0.5B g128,
45% / 13% with `--awq-rounding rtn` against 60% / 52% for the default (55% / 56% over 12,288 tokens).

Run from the repository root, e.g.:
  tuneserve quantize qwen2.5-coder-0.5b --method awq --bits 4 --group-size 128 --out results/awq-gptq
  tuneserve quantize qwen2.5-coder-0.5b --method awq --bits 4 --group-size 128 --awq-rounding rtn --out results/awq-rtn
  python docs/bench-scripts/awq_rtn_loss_recovery.py qwen2.5-coder-0.5b 128 12288 results/awq-gptq results/awq-rtn
"""

from __future__ import annotations

import argparse
import copy
import os

import torch

from tuneserve.calibration.calibrate import corpus_tokens, fresh_context
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model, quantize_model, quantize_with_recipe
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.tokenizer import load_tokenizer

WINDOW = 512


def window_nll(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(windows,) summed NLL of each window's predicted tokens, scored 128 rows of logits at a time."""
    out = []
    for s in range(0, len(ids) - WINDOW + 1, WINDOW):
        x = torch.tensor(ids[s:s + WINDOW])
        h = model(x, fresh_context(model.arch, [WINDOW], torch.device("cpu"), torch.float32))
        total = 0.0
        for r0 in range(0, WINDOW - 1, 128):
            r1 = min(WINDOW - 1, r0 + 128)
            lp = torch.log_softmax(model.compute_logits(h[r0:r1]).float(), -1)
            total -= float(lp.gather(1, x[r0 + 1:r1 + 1].unsqueeze(1)).sum())
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def recovery(nll: dict[str, torch.Tensor], sel: torch.Tensor) -> dict[str, float]:
    """Each checkpoint's share of RTN's NLL loss recovered over the selected windows."""
    f, r = nll["fp32"][sel].sum(), nll["rtn"][sel].sum()
    return {k: float((r - v[sel].sum()) / (r - f)) for k, v in nll.items() if k not in ("fp32", "rtn")}


def load_models(model: str, group: int, dirs: list[str]) -> tuple[object, dict[str, torch.nn.Module]]:
    """The tokenizer and the fp32 model, its RTN int4 copy and one copy per checkpoint directory."""
    cfg = EngineArgs(model=model).create_engine_config()
    fp = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
    models = {"fp32": fp, "rtn": copy.deepcopy(fp)}
    quantize_with_recipe(models["rtn"], QuantRecipe(method="rtn", bits=4, group_size=group), progress=False)
    for d in dirs:
        models[d] = copy.deepcopy(fp)
        quantize_model(models[d], d, progress=False)
    return load_tokenizer(cfg.model.path, cfg.model.tokenizer), models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("group", type=int, help="RTN baseline's group size (the checkpoints' own)")
    p.add_argument("tokens", type=int, help="evaluation tokens per corpus")
    p.add_argument("dirs", nargs="+", help="quantized checkpoint directories (tuneserve quantize --out)")
    ns = p.parse_args()
    os.environ.setdefault("TUNESERVE_QUIET", "1")
    torch.set_grad_enabled(False)
    tok, models = load_models(ns.model, ns.group, ns.dirs)
    g = torch.Generator().manual_seed(0)
    for corpus in ("wikipedia", "python-docs"):
        ids = corpus_tokens(tok, corpus, ns.tokens)
        nll = {k: window_nll(m, ids) for k, m in models.items()}
        n = len(nll["fp32"])
        for w in sorted({8, n}):
            sel = torch.arange(min(w, n))
            boots = [recovery(nll, sel[torch.randint(len(sel), (len(sel),), generator=g)]) for _ in range(500)]
            se = {k: float(torch.tensor([b[k] for b in boots]).std()) for k in boots[0]}
            shown = "  ".join(f"{k} {100 * v:.1f}% (se {100 * se[k]:.1f})" for k, v in recovery(nll, sel).items())
            print(f"{corpus}, {len(sel) * (WINDOW - 1)} scored tokens: {shown}", flush=True)


if __name__ == "__main__":
    main()
