"""A/B in one process: the main bench offline workload with the small-batch dense kernel off, on, off, on."""
import os, time
os.environ["TUNESERVE_QUIET"] = "1"
from tuneserve import LLM
from tuneserve.bench.offline import corpus_workload, run_engine, warm_up
from tuneserve.kernels import dense_ops
llm = LLM("smollm2-135m")
warm_up(llm)
work = corpus_workload(llm.get_tokenizer(), "wikipedia", 64, 64, 512, 128, 0)
for label, m in (("torch only", 0), ("dense kernel", 24), ("torch only", 0), ("dense kernel", 24)):
    dense_ops.SMALL_M = m
    llm.llm_engine.kv.reset_prefix_cache()
    r = run_engine(llm, work)
    print(f"{label:13s} output {r['output_tok_s']:6.1f} tok/s  total {r['total_tok_s']:6.1f}  ttft {r['mean_ttft_s']:.2f}s  tpot {r['mean_tpot_s']*1e3:.1f}ms", flush=True)
