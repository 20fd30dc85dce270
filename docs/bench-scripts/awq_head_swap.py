import copy, sys, os
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from torch import nn
from tuneserve.engine_args import EngineArgs
from tuneserve.loading import load_model
from tuneserve.tokenizer import load_tokenizer
from tuneserve.loading import quantize_model
from tuneserve.calibration.calibrate import corpus_tokens
from tuneserve.quant.apply import pack_weight
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.bench.quality import evaluate
torch.set_grad_enabled(False)
cfg = EngineArgs(model="qwen2.5-coder-0.5b").create_engine_config()
tok = load_tokenizer(cfg.model.path, cfg.model.tokenizer)
m = load_model(cfg.model.path, cfg.model.arch, torch.device("cpu"), "float32")
head = copy.deepcopy(m.lm_head)
quantize_model(m, sys.argv[1])
for c in ("wikipedia", "python-docs"):
    ids = corpus_tokens(tok, c, 4096)
    res = {}
    q = m.lm_head
    res["as saved"] = evaluate({"x": (m, 0)}, ids, progress=False)[0]["perplexity"]
    m.lm_head = head
    res["fp32 head"] = evaluate({"x": (m, 0)}, ids, progress=False)[0]["perplexity"]
    m.lm_head = pack_weight(head.weight.float(), QuantRecipe(bits=4, group_size=128))
    res["rtn head"] = evaluate({"x": (m, 0)}, ids, progress=False)[0]["perplexity"]
    m.lm_head = q
    print(c, {k: round(v, 3) for k, v in res.items()}, flush=True)
