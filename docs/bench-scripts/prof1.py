"""Where a batch-1 decode step goes: cProfile of 128 decode steps (SmolLM2 fp32), and torch op times."""
import cProfile, pstats, time, os
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve import LLM, SamplingParams
llm = LLM("smollm2-135m")
p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
prompt = [list(range(1000, 1064))]
llm.generate(prompt, p, use_tqdm=False)  # warm
t0 = time.perf_counter(); llm.generate(prompt, p, use_tqdm=False); dt = time.perf_counter() - t0
print(f"128 tokens in {dt:.2f}s: {dt/128*1e3:.1f} ms/token")
pr = cProfile.Profile(); pr.enable(); llm.generate(prompt, p, use_tqdm=False); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as prof:
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
