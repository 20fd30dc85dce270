"""llm-compressor AWQ (W4A16-style) on Qwen2.5-Coder-0.5B with our calibration windows; perplexity on our
eval windows (512, stride 512, the same scoring as tuneserve eval)."""
import json, math, sys, time
import torch
torch.Tensor.pin_memory = lambda self, *a, **k: self  # CPU-only machine: nothing to pin
from datasets import Dataset
from transformers import AutoModelForCausalLM

sym = sys.argv[1] == "sym"
group = int(sys.argv[2])
src = "/tmp/llmc_work/qwen-hf"
calib = json.load(open("/tmp/llmc_work/qwen_calib.json"))[:int(sys.argv[3])]
evals = json.load(open("/tmp/llmc_work/qwen_eval_ids.json"))


def windows(n, w=512, stride=512):
    out = [(s, s + w) for s in range(0, n - w + 1, stride)]
    if out[-1][1] < n:
        out.append((n - w, n))
    return out


@torch.inference_mode()
def perplexity(model, ids):
    nll, cnt, prev = 0.0, 0, 0
    for s, e in windows(len(ids)):
        x = torch.tensor([ids[s:e]])
        lp = torch.log_softmax(model(x).logits[0].float(), -1)
        first = max(s + 1, prev) - s - 1
        for r in range(first, e - s - 1):
            nll -= float(lp[r, ids[s + r + 1]])
            cnt += 1
        prev = e
    return math.exp(nll / cnt), cnt


model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
res = {}
if "--fp32" in sys.argv:
    res["fp32"] = {c: perplexity(model, ids) for c, ids in evals.items()}
    print(res, flush=True)
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier

scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
    num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group))
recipe = [AWQModifier(duo_scaling=True), QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]
ds = Dataset.from_dict({"input_ids": calib, "attention_mask": [[1] * len(w) for w in calib]})
t0 = time.time()
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=512, num_calibration_samples=len(calib))
print("oneshot seconds", time.time() - t0, flush=True)
key = f"qwen-llmcompressor-awq-n{len(calib)}-{'sym' if sym else 'asym'}-g{group}"
res[key] = {c: perplexity(model, ids) for c, ids in evals.items()}
print(json.dumps(res), flush=True)
json.dump(res, open(f"/tmp/llmc_work/{key}.json", "w"))
