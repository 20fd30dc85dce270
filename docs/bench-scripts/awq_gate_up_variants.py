"""Re-quantize only gate|up of an AWQ checkpoint with a variant of the method, then score perplexity.

usage: python awq_gate_up_variants.py MODEL GROUP AWQ_DIR VARIANT [samples]
VARIANT: as-is | noclip | plainclip | nosink | rtn"""
import copy, os, sys
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.loading import quantize_model
from tuneserve.calibration.calibrate import corpus_tokens, calibration_windows, InputStats
from tuneserve.calibration.sequential import Calibrator, _codes_from
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.quant.apply import replace_module, from_quantized, pack_weight
from tuneserve.calibration.awq import awq_search, _quant_dequant
from tuneserve.bench.quality import evaluate
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G, awq_dir, variant = int(sys.argv[2]), sys.argv[3], sys.argv[4]
samples = int(sys.argv[5]) if len(sys.argv) > 5 else 128
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
fp = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
m = copy.deepcopy(fp)
quantize_model(m, awq_dir, progress=False)
spec = QuantRecipe(method="awq", bits=4, group_size=G)
wins = calibration_windows(tok, spec.corpus, samples, 512, 0)
cal = Calibrator(m, spec, wins)
hidden = [m.embed(b) for b in cal.ids]
alphas = []
for i, layer in enumerate(m.layers):
    f = fp.layers[i]
    layer.post_attention_layernorm = copy.deepcopy(f.post_attention_layernorm)
    attn, mlp = layer.self_attn, layer.mlp
    h1 = [h + attn(layer.input_layernorm(h), cal.ctx(b)) for h, b in zip(hidden, cal.ids)]
    xs = [layer.post_attention_layernorm(h) for h in h1]
    st = InputStats(xs[0].shape[-1])
    for x in xs:
        if variant == "nosink":
            x = x.view(-1, 512, x.shape[-1])[:, 4:]
        st.add(x)
    w = f.mlp.gate_up_proj.weight.detach().float()
    if variant == "rtn":
        new = pack_weight(w, spec)
    else:
        h = st.hessian
        s, alpha = awq_search(w, h, st.abs_mean, 4, G)
        alphas.append(alpha)
        hs = h / s.unsqueeze(0) / s.unsqueeze(1)
        clip = variant != "noclip"
        deq, scales, mins = _quant_dequant(w * s, 4, G, False, None if variant == "plainclip" else hs, clip)
        layer.post_attention_layernorm.weight.data /= s
        new = from_quantized(_codes_from(deq, scales, mins), scales, mins, f.mlp.gate_up_proj)
    replace_module(m, f"layers.{i}.mlp.gate_up_proj", new)
    hidden = [h + layer.mlp(layer.post_attention_layernorm(h)) for h in h1]
print(variant, "alphas", [round(a, 2) for a in alphas], flush=True)
for corpus in ("wikipedia", "python-docs"):
    ids = corpus_tokens(tok, corpus, 4096)
    r = evaluate({"x": (m, 0)}, ids, progress=False)[0]
    print(variant, corpus, f"ppl {r['perplexity']:.3f}", flush=True)
