# Median engine step time of a batch-1 greedy decode (SmolLM2, fp32); `ftz` forces flush-to-zero first.
# Run from a tree (PYTHONPATH=<tree> for another revision): python docs/bench-scripts/step_bench.py [ftz]
import os, sys, time, statistics
os.environ["TUNESERVE_QUIET"] = "1"
import torch
from tuneserve import LLM, SamplingParams
ftz = len(sys.argv) > 1 and sys.argv[1] == "ftz"
llm = LLM("smollm2-135m", max_model_len=1024)
if ftz:
    torch.set_flush_denormal(True)
eng = llm.llm_engine
p = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
res = []
for rep in range(2):
    eng.add_request(f"r{rep}", "The history of the city begins", p)
    times = []
    while eng.has_unfinished_requests():
        t0 = time.perf_counter(); eng.step(); times.append(time.perf_counter() - t0)
    res.append(statistics.median(times[5:]))
import tuneserve
print(tuneserve.__file__.split("/")[1:3], "ftz" if ftz else "", "median step ms", [round(1e3 * r, 2) for r in res])
