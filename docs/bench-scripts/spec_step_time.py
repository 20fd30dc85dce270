import os, time, sys
os.environ["TUNESERVE_QUIET"] = "1"
from tuneserve import LLM, SamplingParams
from tuneserve.bench.spec import grounded_prompts
from tuneserve.engine.llm_engine import LLMEngine
from tuneserve.speculative.decoder import SpecDecoder
k = int(sys.argv[1]); adaptive = sys.argv[2] == "1"
spec = {"method": "ngram", "num_speculative_tokens": k, "adaptive": adaptive} if k else None
llm = LLM("smollm2-135m", speculative_config=spec)
tok = llm.get_tokenizer()
prompts = grounded_prompts(tok, 32)
p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
rec = []
orig_step = LLMEngine.step
def step(self):
    t0 = time.perf_counter(); r = orig_step(self); rec.append(time.perf_counter() - t0); return r
LLMEngine.step = step
obs = []
if spec:
    orig_obs = SpecDecoder.observe
    def observe(self, sched, out, seconds):
        obs.append((sched.num_batched_tokens, seconds)); return orig_obs(self, sched, out, seconds)
    SpecDecoder.observe = observe
llm.generate(prompts[:4], p, use_tqdm=False)
rec.clear(); obs.clear()
t0 = time.perf_counter(); llm.generate(prompts, p, use_tqdm=False); dt = time.perf_counter() - t0
print(f"k={k} adaptive={adaptive}: {32*128/dt:.1f} tok/s, steps {len(rec)}, step wall {sum(rec):.2f}s of {dt:.2f}s, observed {sum(s for _, s in obs):.2f}s")
if obs:
    dec = [(n, s) for n, s in obs if n <= 400]
    import collections
    b = collections.defaultdict(list)
    for n, s in dec: b[n // 32 * 32].append(s)
    print(" ".join(f"N~{n}:{sum(v)/len(v)*1e3:.0f}ms(x{len(v)})" for n, v in sorted(b.items())))
