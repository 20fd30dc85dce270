import json, torch
from transformers import AutoModelForCausalLM
from tuneserve.weights.sources import alias_path
from tuneserve.tokenizer import load_tokenizer
from tuneserve.quant.calibrate import calibration_windows, corpus_tokens
p = alias_path("qwen2.5-coder-0.5b")
tok = load_tokenizer(str(p))
m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
cfg = m.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
print(plain.load_state_dict(m.state_dict(), strict=False))
plain.save_pretrained("/tmp/llmc_work/qwen-hf"); tok.save_pretrained("/tmp/llmc_work/qwen-hf")
json.dump(calibration_windows(tok, "wikipedia+python-docs", 128, 512, 0), open("/tmp/llmc_work/qwen_calib.json", "w"))
json.dump({c: corpus_tokens(tok, c, 4096) for c in ("wikipedia", "python-docs")}, open("/tmp/llmc_work/qwen_eval_ids.json", "w"))
print("ok", cfg.tie_word_embeddings)
