"""Perplexity of quantized checkpoint BASE with one module kind at a time (all layers) taken from checkpoint
DONOR, with the norm a donor folded its AWQ scales into. Paired: which kind makes one method better or worse.
Also where the donor's per-token losses differ from the base's (by position in the window, and how
concentrated). `module_swap.py MODEL G rtn AWQ_DIR` is the old awq_module_swap.py.
usage: python module_swap.py MODEL GROUP BASE DONOR [corpus ...]   (BASE or DONOR may be 'rtn')"""
import copy, os, sys
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.loading import quantize_model, quantize_with_recipe
from tuneserve.calibration.calibrate import corpus_tokens, fresh_context
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.quant.apply import replace_module
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G, a_dir, b_dir = int(sys.argv[2]), sys.argv[3], sys.argv[4]
corpora = sys.argv[5:] or ["wikipedia", "python-docs"]
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
fp = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")


def make(d):
    m = copy.deepcopy(fp)
    if d == "rtn":
        quantize_with_recipe(m, QuantRecipe(method="rtn", bits=4, group_size=G), progress=False)
    else:
        quantize_model(m, d, progress=False)
    return m


def nll(model, ids, win=512):
    """Per-token negative log-likelihood over windows of `win` tokens."""
    out = []
    for s in range(0, len(ids) - 1, win):
        x = torch.tensor(ids[s:s + win])
        ctx = fresh_context(model.arch, [x.numel()], torch.device("cpu"), torch.float32)
        h = model(x, ctx)
        for r0 in range(0, x.numel() - 1, 128):
            r1 = min(x.numel() - 1, r0 + 128)
            lp = torch.log_softmax(model.compute_logits(h[r0:r1]).float(), -1)
            out.append(-lp.gather(1, x[r0 + 1:r1 + 1].unsqueeze(1)).squeeze(1))
    return torch.cat(out)


def names(i, kind):
    p = f"layers.{i}."
    return {"qkv": [p + "self_attn.qkv_proj", p + "input_layernorm"], "o": [p + "self_attn.o_proj"],
            "gate_up": [p + "mlp.gate_up_proj", p + "post_attention_layernorm"], "down": [p + "mlp.down_proj"]}[kind]


A, B = make(a_dir), make(b_dir)
L = len(fp.layers)
kinds = {k: [n for i in range(L) for n in names(i, k)] for k in ("qkv", "o", "gate_up", "down")}
kinds["head"] = ["lm_head" if fp.lm_head is not None else "embed_tokens"]
for corpus in corpora:
    ids = corpus_tokens(tok, corpus, 4096)
    f, a, b = nll(fp, ids), nll(A, ids), nll(B, ids)
    print(f"{corpus}: ppl fp {float(f.mean().exp()):.3f} base {float(a.mean().exp()):.3f}"
          f" donor {float(b.mean().exp()):.3f}", flush=True)
    d = b - a
    pos = torch.arange(len(d)) % 511
    for lo, hi in ((0, 4), (4, 32), (32, 128), (128, 511)):
        sel = (pos >= lo) & (pos < hi)
        print(f"  positions {lo:3d}-{hi:3d}: mean nll fp {f[sel].mean():.3f} base {a[sel].mean():.3f}"
              f" donor {b[sel].mean():.3f}  (donor-base summed {d[sel].sum():+.1f})")
    srt = d.sort(descending=True).values
    print(f"  donor-base total {d.sum():+.1f} nats; top 10 tokens {srt[:10].sum():+.1f}, top 50 {srt[:50].sum():+.1f},"
          f" bottom 50 {srt[-50:].sum():+.1f}")
    for k, ns in kinds.items():
        saved = {n: A.get_submodule(n) for n in ns}
        for n in ns:
            replace_module(A, n, B.get_submodule(n))
        v = nll(A, ids)
        for n, m in saved.items():
            replace_module(A, n, m)
        print(f"  base + donor {k:8s} ppl {float(v.mean().exp()):.3f}  (vs base {float((v - a).sum()):+.1f} nats)",
              flush=True)
