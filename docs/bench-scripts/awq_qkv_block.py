"""qkv only: RTN vs AWQ (per-linear objective) vs AWQ (attention-output objective); ppl with only qkv quantized."""
import copy, sys, os, time
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.calibration.calibrate import calibration_windows, corpus_tokens, InputStats
from tuneserve.calibration.sequential import Calibrator
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.calibration.awq import _quant_dequant, awq_quantize
from tuneserve.calibration.gptq import weighted_error
from tuneserve.bench.quality import evaluate
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G = int(sys.argv[2]); which = sys.argv[3]  # qkv | gu
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
model = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
wins = calibration_windows(tok, "wikipedia", 16, 512, 0)
cal = Calibrator(model, QuantRecipe(method="awq"), wins)
ids = corpus_tokens(tok, "wikipedia", 4096)
hidden = [model.embed(b) for b in cal.ids]
lin = copy.deepcopy(model); blk = copy.deepcopy(model)
t0 = time.time()
for i, layer in enumerate(model.layers):
    attn, mlp = layer.self_attn, layer.mlp
    xin = [layer.input_layernorm(h) for h in hidden]
    if which == "qkv":
        mod, xs = attn.qkv_proj, xin
        fwd = lambda m, j: m.layers[i].self_attn(xin[j], cal.ctx(cal.ids[j]))
    att = [attn(x, cal.ctx(b)) for x, b in zip(xin, cal.ids)]
    h1 = [h + a for h, a in zip(hidden, att)]
    xm = [layer.post_attention_layernorm(h) for h in h1]
    if which == "gu":
        mod, xs = mlp.gate_up_proj, xm
        fwd = lambda m, j: m.layers[i].mlp(xm[j])
    st = InputStats(xs[0].shape[-1]); [st.add(x) for x in xs]
    w = mod.weight.detach().float()
    r = awq_quantize(w, st.hessian, st.abs_mean, 4, G)
    getattr(lin.layers[i].self_attn if which == "qkv" else lin.layers[i].mlp, "qkv_proj" if which == "qkv" else "gate_up_proj").weight.data.copy_(r["w_hat"])
    # block objective on the first calibration batch
    target_mod = getattr(blk.layers[i].self_attn if which == "qkv" else blk.layers[i].mlp, "qkv_proj" if which == "qkv" else "gate_up_proj")
    ref = fwd(model, 0)
    x = st.abs_mean.clamp(min=1e-6)
    best = (float("inf"), None, None)
    for a in range(21):
        s = x.pow(a / 20); s = s / (s.max() * s.min()).sqrt()
        target_mod.weight.data.copy_(_quant_dequant(w * s, 4, G, False, None, False)[0] / s)
        err = float(((fwd(blk, 0) - ref) ** 2).sum())
        if err < best[0]:
            best = (err, s, a / 20)
    s = best[1]
    hs = st.hessian / s.unsqueeze(0) / s.unsqueeze(1)
    target_mod.weight.data.copy_(_quant_dequant(w * s, 4, G, False, hs, True)[0] / s)
    print(i, "alpha lin", r["alpha"], "blk", best[2], f"{time.time()-t0:.0f}s", flush=True)
    out = [h + mlp(x) for h, x in zip(h1, xm)]
    hidden = out
for name, m in (("awq-linear", lin), ("awq-block", blk)):
    print(name, "ppl %.3f" % evaluate({name: (m, 0)}, ids, progress=False)[0]["perplexity"], flush=True)
