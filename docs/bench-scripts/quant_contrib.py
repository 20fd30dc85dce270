"""Which modules' RTN-int4 rounding costs Qwen's perplexity: quantize one module kind at a time."""
import copy, sys, os
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from torch import nn
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.calibration.calibrate import corpus_tokens
from tuneserve.quant.apply import target_layers, pack_weight, replace_module
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.bench.quality import evaluate
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G = int(sys.argv[2]); corpus = sys.argv[3]
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
model = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
ids = corpus_tokens(tok, corpus, 4096)
spec = QuantRecipe(method="rtn", bits=4, group_size=G)
def variant(pred):
    m = copy.deepcopy(model)
    for name, mod in list(target_layers(m, True)):
        if pred(name):
            b = getattr(mod, "bias", None)
            new = pack_weight(mod.weight.detach().float(), spec, isinstance(mod, nn.Embedding), b.detach() if b is not None else None)
            replace_module(m, name, new)
    return m
kinds = {"fp32": lambda n: False, "all": lambda n: True, "embed": lambda n: n == "embed_tokens", "lm_head": lambda n: n == "lm_head",
         "qkv": lambda n: "qkv" in n, "o": lambda n: "o_proj" in n, "gate_up": lambda n: "gate_up" in n, "down": lambda n: "down_proj" in n,
         "layers0-3": lambda n: any(n.startswith(f"layers.{i}.") for i in range(4)), "layers20-23": lambda n: any(n.startswith(f"layers.{i}.") for i in range(20, 24))}
for k, pred in kinds.items():
    m = variant(pred)
    r = evaluate({k: (m, 0)}, ids, progress=False)[0]
    print(f"{k:12s} ppl {r['perplexity']:.3f}", flush=True)
    del m
