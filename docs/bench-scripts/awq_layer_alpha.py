import torch, sys, time
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.calibration.calibrate import calibration_windows, InputStats
from tuneserve.calibration.sequential import Calibrator, _attention_output, _mlp_hidden
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.calibration.awq import _quant_dequant
from tuneserve.calibration.gptq import weighted_error
from tuneserve.quant.rtn import fake_quant
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G = int(sys.argv[2])
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
model = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
wins = calibration_windows(tok, "wikipedia", 16, 512, 0)
cal = Calibrator(model, QuantRecipe(method="gptq"), wins)
hidden = [model.embed(b) for b in cal.ids]
def st(xs):
    s = InputStats(xs[0].shape[-1]); [s.add(x) for x in xs]; return s
def variants(w, s_):
    h, x = s_.hessian, s_.abs_mean.clamp(min=1e-6)
    wmax = (w.abs().view(w.shape[0], -1, G) / w.abs().view(w.shape[0], -1, G).amax(-1, keepdim=True)).view_as(w).mean(0).clamp(min=1e-6)
    base = weighted_error(fake_quant(w, 4, G, False) - w, h)
    r = {"clip": weighted_error(_quant_dequant(w, 4, G, False, h, True)[0] - w, h) / base}
    best, bestd = 9e9, 9e9
    for i in range(21):
        a = i / 20
        sc = x.pow(a); sc = sc / (sc.max() * sc.min()).sqrt()
        e = weighted_error(_quant_dequant(w * sc, 4, G, False, None, False)[0] / sc - w, h)
        best = min(best, e)
        sd = x.pow(a) / wmax.pow(1 - a); sd = sd / (sd.max() * sd.min()).sqrt()
        e = weighted_error(_quant_dequant(w * sd, 4, G, False, None, False)[0] / sd - w, h)
        bestd = min(bestd, e)
    r["awq"] = best / base; r["duo"] = bestd / base
    return r
for i, layer in enumerate(model.layers):
    attn, mlp = layer.self_attn, layer.mlp
    xin = [layer.input_layernorm(h) for h in hidden]
    att = [_attention_output(attn, x, cal.ctx(b)) for x, b in zip(xin, cal.ids)]
    h1 = [h + attn.o_proj(a) for h, a in zip(hidden, att)]
    xm = [layer.post_attention_layernorm(h) for h in h1]
    dn = [_mlp_hidden(mlp, x) for x in xm]
    out = [h + mlp.down_proj(d) for h, d in zip(h1, dn)]
    if i % 4 == 1 or i in (2, 22):
        for name, mod, xs in (("qkv", attn.qkv_proj, xin), ("o", attn.o_proj, att), ("gu", mlp.gate_up_proj, xm), ("down", mlp.down_proj, dn)):
            r = variants(mod.weight.float(), st(xs))
            print(i, name, " ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    hidden = out
