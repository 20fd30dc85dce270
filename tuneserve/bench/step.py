"""`tuneserve bench step`: where a decode step's time goes, with the fused decode step and without.

Two engines on the same model and arguments, one with the default kernels (decode steps in one compiled
call, models/fused_decode.py) and one with kernels="unfused" (the same compiled kernels called op by op),
decode `--tokens` tokens after a 64-token prompt at each batch size, alternating runs so that drift on
the machine hits both alike. Each step is split by timing the engine's own calls:
  kernels  the fused call: every layer's matmuls, attention, and the elementwise work between them
  head     compute_logits (the LM head's matmul: weight reads too)
  forward  the rest of the model call (embedding, final norm, and on the unfused path every layer's
           dispatch from Python around the same kernels)
  engine   the rest of the step: scheduling, batch tensors, sampling, detokenization, outputs
The share outside weight reads and attention is (step - kernels - head) / step; for the unfused engine
`kernels` is the fused engine's figure (the same kernels on the same rows), since its kernels cannot be
timed apart from their dispatch.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from tuneserve.bench.records import table, write_json
from tuneserve.engine_args import EngineArgs
from tuneserve.kernels import decode_step
from tuneserve.kernels.config import cpu_name
from tuneserve.sampling_params import SamplingParams

COLUMNS = ["kernels", "batch", "tok_s", "step_ms", "kernels_ms", "head_ms", "forward_ms", "engine_ms",
           "outside_share", "speedup"]


class _Timed:
    """Wraps a callable and sums the seconds spent in it."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kw)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


class _Probe:
    """One engine with its step's parts timed."""

    def __init__(self, llm: Any, label: str) -> None:
        self.llm, self.label = llm, label
        model = llm.llm_engine.model
        self.forward = _Timed(model.forward)
        self.head = _Timed(model.compute_logits)
        model.forward, model.compute_logits = self.forward, self.head  # instance attributes shadow the methods

    def run(self, batch: int, tokens: int) -> dict[str, float]:
        """Decode `tokens` steps after the prompts; per-step means in seconds."""
        eng = self.llm.llm_engine
        params = SamplingParams(max_tokens=tokens + 1, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            eng.add_request(f"s{i}", {"prompt_token_ids": [100 + (7 * i + j) % 1000 for j in range(64)]}, params)
        eng.step()  # the prompts (one chunk): not timed
        self.forward.seconds = self.head.seconds = 0.0
        kernel0 = _FUSED.seconds
        steps, t0 = 0, time.perf_counter()
        while eng.has_unfinished_requests():
            eng.step()
            steps += 1
        step = (time.perf_counter() - t0) / steps
        return {"step": step, "forward": self.forward.seconds / steps, "head": self.head.seconds / steps,
                "kernels": (_FUSED.seconds - kernel0) / steps}


_FUSED = _Timed(decode_step.run)


def main(ns: Any) -> int:
    from tuneserve.llm import LLM

    decode_step.run = _FUSED  # models/fused_decode.py calls it through the module
    args = EngineArgs.from_cli_args(ns)
    probes = [_Probe(LLM(**{**args.to_dict(), "kernels": k}), k) for k in ("unfused", "auto")]
    batches = [int(b) for b in ns.batch.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {}
    for p in probes:
        p.run(1, 4)  # warm-up
    for _ in range(ns.reps):
        for b in batches:
            for p in probes:
                runs.setdefault((p.label, b), []).append(p.run(b, ns.tokens))
    rows = _rows(runs, batches)
    print(table(rows, COLUMNS, title=f"bench step: {args.model}, decode after 64-token prompts, {ns.tokens} "
                                     f"steps x {ns.reps} runs, medians; cpu: {cpu_name()}"))
    write_json(ns.json, {"engine_args": args.to_dict(), "cpu": cpu_name(), "rows": rows})
    return 0


def _rows(runs: dict[tuple[str, int], list[dict]], batches: list[int]) -> list[dict]:
    rows = []
    for b in batches:
        med = {k: {part: statistics.median(r[part] for r in runs[(k, b)]) for part in runs[(k, b)][0]}
               for k in ("unfused", "auto")}
        kernels = med["auto"]["kernels"]  # the same kernels; only the fused engine can time them apart
        for k in ("unfused", "auto"):
            m = med[k]
            forward_rest = m["forward"] - (m["kernels"] if k == "auto" else kernels)
            rows.append({"kernels": k, "batch": b, "tok_s": b / m["step"], "step_ms": m["step"] * 1e3,
                         "kernels_ms": kernels * 1e3, "head_ms": m["head"] * 1e3, "forward_ms": forward_rest * 1e3,
                         "engine_ms": (m["step"] - m["forward"] - m["head"]) * 1e3,
                         "outside_share": (m["step"] - kernels - m["head"]) / m["step"],
                         "speedup": med["unfused"]["step"] / m["step"]})
    return rows


def add_parser(sub: Any) -> None:
    p = sub.add_parser("step", help="where a decode step's time goes, fused decode step vs op by op")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--batch", default="1,4,8", help="decode batch sizes")
    p.add_argument("--tokens", type=int, default=64, help="decode steps per run")
    p.add_argument("--reps", type=int, default=3, help="runs per engine and batch (medians reported)")
    p.add_argument("--json", help="write results here")
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(bench_main=main)
