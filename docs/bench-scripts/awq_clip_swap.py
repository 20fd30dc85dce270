"""Per module kind, what AWQ's clipping search does to perplexity: quantize AWQ without clipping (in memory),
then swap in one kind at a time from a clipped AWQ checkpoint (with the norms its scales were folded into).

usage: python awq_clip_swap.py MODEL GROUP CLIPPED_AWQ_DIR [NOCLIP_OUT_DIR]"""
import copy, os, sys
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.loading import quantize_model, quantize_with_recipe
from tuneserve.calibration.calibrate import corpus_tokens
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.quant.apply import replace_module
from tuneserve.bench.quality import evaluate
torch.set_grad_enabled(False)
cfg = EngineArgs(model=sys.argv[1]).create_engine_config()
G, clipped_dir = int(sys.argv[2]), sys.argv[3]
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
fp = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
clipped = copy.deepcopy(fp)
quantize_model(clipped, clipped_dir, progress=False)
noclip = fp
quantize_with_recipe(noclip, QuantRecipe(method="awq", bits=4, group_size=G, clip_search=False), progress=False, tokenizer=tok)
KINDS = {"qkv": ["self_attn.qkv_proj", "input_layernorm"], "o": ["self_attn.o_proj"],
         "gate_up": ["mlp.gate_up_proj", "post_attention_layernorm"], "down": ["mlp.down_proj"]}
ids = {c: corpus_tokens(tok, c, 4096) for c in ("wikipedia", "python-docs")}


def ppl(m):
    return " ".join(f"{c} {evaluate({'x': (m, 0)}, t, progress=False)[0]['perplexity']:.3f}" for c, t in ids.items())


print("noclip", ppl(noclip), flush=True)
for kind, parts in list(KINDS.items()) + [("head", None)]:
    names = ([f"layers.{i}.{p}" for i in range(len(fp.layers)) for p in parts] if parts else
             ["lm_head" if fp.lm_head is not None else "embed_tokens"])
    saved = {n: noclip.get_submodule(n) for n in names}
    for n in names:
        replace_module(noclip, n, clipped.get_submodule(n))
    print(f"noclip + clipped {kind}", ppl(noclip), flush=True)
    for n, mod in saved.items():
        replace_module(noclip, n, mod)
