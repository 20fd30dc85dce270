"""Share of each projection's input energy (sum of x^2) held by the first 4 tokens of each 512-token window
("attention sinks"), and the largest |x| and residual value, per layer of Qwen2.5-Coder-0.5B (8 windows)."""
import os; os.environ["TUNESERVE_QUIET"]="1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.calibration.calibrate import calibration_windows
from tuneserve.calibration.sequential import Calibrator, _mlp_hidden
from tuneserve.quant.recipe import QuantRecipe
torch.set_grad_enabled(False); torch.set_num_threads(1)
cfg = EngineArgs(model="qwen2.5-coder-0.5b").create_engine_config()
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
m = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
wins = calibration_windows(tok, "wikipedia+python-docs", 8, 512, 0)
cal = Calibrator(m, QuantRecipe(method="awq"), wins)
h = m.embed(cal.ids[0])
for i, l in enumerate(m.layers):
    x = l.input_layernorm(h)
    a = l.self_attn(x, cal.ctx(cal.ids[0])); h1 = h + a
    xm = l.post_attention_layernorm(h1); d = _mlp_hidden(l.mlp, xm)
    out = []
    for nm, t in (("qkv", x), ("gu", xm), ("down", d)):
        t = t.view(-1, 512, t.shape[-1]); e = t.pow(2).sum(-1)  # (W, 512)
        out.append(f"{nm} sink-share {float(e[:, :4].sum() / e.sum()):.2f} max|x| {float(t.abs().max()):.0f}")
    print(i, "resid max", f"{float(h1.abs().max()):.0f}", " | ".join(out), flush=True)
    h = h1 + l.mlp.down_proj(d)
