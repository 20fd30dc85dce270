"""Where an AWQ checkpoint loses perplexity against RTN: per-token NLL by position, and RTN models with one
module kind swapped for AWQ's (with the norm AWQ folded its scales into).

usage: python awq_module_swap.py MODEL GROUP AWQ_DIR [corpus ...]"""
import copy, os, sys
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.models.loader import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.quant import quantize_model, quantize_with_spec
from tuneserve.quant.calibrate import corpus_tokens, fresh_context
from tuneserve.quant.spec import QuantSpec
from tuneserve.quant.apply import replace_module
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G, awq_dir = int(sys.argv[2]), sys.argv[3]
corpora = sys.argv[4:] or ["wikipedia", "python-docs"]
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
fp = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
rtn = copy.deepcopy(fp)
quantize_with_spec(rtn, QuantSpec(method="rtn", bits=4, group_size=G), progress=False)
awq = copy.deepcopy(fp)
quantize_model(awq, awq_dir, progress=False)


def nll(model, ids, win=512):
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


def swap_names(i, kind):
    p = f"layers.{i}."
    return {"qkv": [p + "self_attn.qkv_proj", p + "input_layernorm"], "o": [p + "self_attn.o_proj"],
            "gate_up": [p + "mlp.gate_up_proj", p + "post_attention_layernorm"], "down": [p + "mlp.down_proj"]}[kind]


def hybrid(names):
    saved = {n: rtn.get_submodule(n) for n in names}
    for n in names:
        replace_module(rtn, n, awq.get_submodule(n))
    return saved


L = len(fp.layers)
for corpus in corpora:
    ids = corpus_tokens(tok, corpus, 4096)
    base = {k: nll(m, ids) for k, m in (("fp", fp), ("rtn", rtn), ("awq", awq))}
    ppl = {k: float(v.mean().exp()) for k, v in base.items()}
    print(corpus, {k: round(v, 3) for k, v in ppl.items()}, flush=True)
    d = base["awq"] - base["rtn"]
    pos = torch.arange(len(d)) % 511
    for lo, hi in ((0, 4), (4, 32), (32, 128), (128, 511)):
        sel = (pos >= lo) & (pos < hi)
        print(f"  positions {lo:3d}-{hi:3d}: mean nll fp {base['fp'][sel].mean():.3f} rtn {base['rtn'][sel].mean():.3f}"
              f" awq {base['awq'][sel].mean():.3f}  (awq-rtn summed {d[sel].sum():+.1f})")
    srt = d.sort(descending=True).values
    print(f"  awq-rtn total {d.sum():+.1f} nats; top 10 tokens {srt[:10].sum():+.1f}, top 50 {srt[:50].sum():+.1f},"
          f" bottom 50 {srt[-50:].sum():+.1f}")
    for kind in ("qkv", "o", "gate_up", "down"):
        names = [n for i in range(L) for n in swap_names(i, kind)]
        saved = hybrid(names)
        v = nll(rtn, ids)
        for n, mod in saved.items():
            replace_module(rtn, n, mod)
        print(f"  rtn + awq {kind:8s} ppl {float(v.mean().exp()):.3f}  (vs rtn {float((v - base['rtn']).sum()):+.1f} nats)",
              flush=True)
    head = "lm_head" if fp.lm_head is not None else "embed_tokens"
    saved = hybrid([head])
    v = nll(rtn, ids)
    replace_module(rtn, head, saved[head])
    print(f"  rtn + awq {head:8s} ppl {float(v.mean().exp()):.3f}", flush=True)
