"""Where a batch-1 n-gram speculative step goes (SmolLM2 fp32, grounded prompts)."""
import cProfile, pstats, time, os, sys
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve import LLM, SamplingParams
from tuneserve.bench.spec import grounded_prompts
k = int(sys.argv[1]) if len(sys.argv) > 1 else 4
spec = {"method": "ngram", "num_speculative_tokens": k, "adaptive": False}
llm = LLM("smollm2-135m", speculative_config=spec)
off = LLM("smollm2-135m")
tok = llm.get_tokenizer() if hasattr(llm, "get_tokenizer") else llm.engine.tokenizer
prompts = grounded_prompts(tok, 4)
p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
for eng, name in ((off, "off"), (llm, "on")):
    eng.generate(prompts[:1], p, use_tqdm=False)
    t0 = time.perf_counter()
    for pr in prompts:
        eng.generate([pr], p, use_tqdm=False)
    dt = time.perf_counter() - t0
    print(f"{name}: {4*128/dt:.1f} tok/s", flush=True)
print(llm.get_stats() if hasattr(llm, "get_stats") else "")
pr = cProfile.Profile(); pr.enable(); llm.generate(prompts[:2], p, use_tqdm=False); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(30)
