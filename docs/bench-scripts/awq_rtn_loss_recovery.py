"""Recovery of RTN's perplexity loss by quantized checkpoints, with its standard error, at several eval
lengths: per-token NLL of fp32, RTN and each checkpoint on the same 512-token windows (stride 512), as
`tuneserve eval` scores them. SE from the spread of per-window recoveries' NLL sums (windows resampled).

usage: python recovery_se.py MODEL GROUP TOKENS DIR [DIR ...]"""
import copy, os, sys
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.loading import quantize_model, quantize_with_recipe
from tuneserve.calibration.calibrate import corpus_tokens, fresh_context
from tuneserve.quant.recipe import QuantRecipe
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G, tokens, dirs = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
fp = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
models = {"fp32": fp}
models["rtn"] = copy.deepcopy(fp)
quantize_with_recipe(models["rtn"], QuantRecipe(method="rtn", bits=4, group_size=G), progress=False)
for d in dirs:
    models[d] = copy.deepcopy(fp)
    quantize_model(models[d], d, progress=False)


def window_nll(model, ids, win=512):
    """(windows,) summed NLL of each window's predicted tokens."""
    out = []
    for s in range(0, len(ids) - win + 1, win):
        x = torch.tensor(ids[s:s + win])
        ctx = fresh_context(model.arch, [win], torch.device("cpu"), torch.float32)
        h = model(x, ctx)
        tot = 0.0
        for r0 in range(0, win - 1, 128):
            r1 = min(win - 1, r0 + 128)
            lp = torch.log_softmax(model.compute_logits(h[r0:r1]).float(), -1)
            tot -= float(lp.gather(1, x[r0 + 1:r1 + 1].unsqueeze(1)).sum())
        out.append(tot)
    return torch.tensor(out, dtype=torch.float64)


def recovery(nll, sel):
    f, r = nll["fp32"][sel].sum(), nll["rtn"][sel].sum()
    return {k: float((r - v[sel].sum()) / (r - f)) for k, v in nll.items() if k not in ("fp32", "rtn")}


g = torch.Generator().manual_seed(0)
for corpus in ("wikipedia", "python-docs"):
    ids = corpus_tokens(tok, corpus, tokens)
    nll = {k: window_nll(m, ids) for k, m in models.items()}
    n = len(nll["fp32"])
    for w in sorted({8, n}):
        sel = torch.arange(min(w, n))
        boots = [recovery(nll, sel[torch.randint(len(sel), (len(sel),), generator=g)]) for _ in range(500)]
        rec = recovery(nll, sel)
        print(corpus, f"{len(sel) * 511} scored tokens:", "  ".join(
            f"{k} {100 * v:.1f}% (se {100 * torch.tensor([b[k] for b in boots]).std():.1f})" for k, v in rec.items()),
            flush=True)
