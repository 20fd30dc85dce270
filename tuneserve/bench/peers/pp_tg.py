"""Prompt processing and token generation measured apart, as llama-bench measures them.

- `pp<N>`: one N-token prompt, alone, to its first token: N / seconds.
- `tg<T>@b<B>`: B requests with `prompt_len`-token prompts started together; once every one has its first
  token, the clock runs over the next T tokens of each: B * T / seconds. Decode only, with the sampling
  (greedy argmax) every engine has to do; llama-bench feeds random tokens instead of sampling.
Each figure is the mean of `reps` runs on fresh random prompts (token ids drawn from the vocabulary: the
speed does not depend on the text), with the spread; every system gets the same prompts and threads. With
several rounds the systems take turns, each round on new prompts, and a row holds every round's runs: on a
machine whose speed drifts over minutes (a shared VM) one system's block of runs would otherwise meet a
different machine than the next one's.
The engine side lives here; HF's and llama.cpp's in hf.py and llama_cpp.py.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from tuneserve.sampling_params import SamplingParams

_clock = time.perf_counter  # a module attribute, so a test can stand in for it without touching `time`


@dataclass
class PpTgPlan:
    pp_len: int = 512
    tg_len: int = 64
    prompt_len: int = 64  # the prompts tg generates after
    batches: tuple[int, ...] = (1, 8, 32)
    reps: int = 3
    seed: int = 0

    def prompts(self, rep: int, n: int, length: int, vocab: int) -> list[list[int]]:
        """n random prompts of `length` ids for repetition rep (the same for every system)."""
        rng = random.Random(hash((self.seed, rep, n, length)))
        return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]

    def for_round(self, i: int) -> PpTgPlan:
        """The plan of round i: the same tests on prompts of their own (round 0 is this plan)."""
        return dataclasses.replace(self, seed=self.seed + i)

    def tests(self) -> list[tuple[str, int]]:
        """(name, batch) of every measurement: pp first, then tg at each batch."""
        return [(f"pp{self.pp_len}", 1)] * bool(self.pp_len) + [(f"tg{self.tg_len}", b) for b in self.batches]


@dataclass
class PpTgRow:
    system: str
    test: str
    batch: int
    threads: int
    runs: list[float] = field(default_factory=list)  # tok/s of each repetition

    def to_dict(self) -> dict[str, Any]:
        mean = statistics.fmean(self.runs)
        sd = statistics.stdev(self.runs) if len(self.runs) > 1 else 0.0
        return {"system": self.system, "test": self.test, "batch": self.batch, "threads": self.threads,
                "tok_s": mean, "tok_s_sd": sd, "reps": len(self.runs)}


def engine_pp_tg(llm: Any, plan: PpTgPlan, threads: int) -> list[PpTgRow]:  # llm: tuneserve.LLM
    """The engine's pp and tg rows (prefix caching cannot help: every repetition has fresh prompts)."""
    eng = llm.llm_engine
    vocab = eng.config.model.arch.vocab_size
    rows = []
    for test, b in plan.tests():
        row = PpTgRow("tuneserve", test, b, threads)
        for rep in range(plan.reps):
            if test.startswith("pp"):
                row.runs.append(_engine_pp(eng, plan.prompts(rep, 1, plan.pp_len, vocab)[0]))
            else:
                row.runs.append(_engine_tg(eng, plan.prompts(rep, b, plan.prompt_len, vocab), plan.tg_len))
        rows.append(row)
    return rows


def _engine_pp(eng: Any, prompt: list[int]) -> float:
    t0 = _clock()
    eng.add_request("pp", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, temperature=0.0))
    while eng.has_unfinished_requests():
        eng.step()
    return len(prompt) / (_clock() - t0)


def _engine_tg(eng: Any, prompts: list[list[int]], tg_len: int) -> float:
    params = SamplingParams(max_tokens=tg_len + 1, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"tg{i}", {"prompt_token_ids": p}, params)
    produced = {f"tg{i}": 0 for i in range(len(prompts))}
    t0, start = None, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            produced[out.request_id] = len(out.outputs[0].token_ids)
        if t0 is None and all(produced.values()):
            t0, start = _clock(), sum(produced.values())
    return (sum(produced.values()) - start) / (_clock() - t0)


def merge_rounds(rounds: list[list[PpTgRow]]) -> list[PpTgRow]:
    """One row per (system, test, batch), holding the runs of every round, in the order first seen."""
    merged: dict[tuple[str, str, int], PpTgRow] = {}
    for rows in rounds:
        for r in rows:
            key = (r.system, r.test, r.batch)
            if key not in merged:
                merged[key] = PpTgRow(r.system, r.test, r.batch, r.threads)
            merged[key].runs.extend(r.runs)
    return list(merged.values())


def add_ratios(rows: list[dict[str, Any]], baseline: str = "llama.cpp") -> None:
    """Each row's tok/s over the baseline system's on the same test and batch (where it ran)."""
    base = {(r["test"], r["batch"]): r["tok_s"] for r in rows if r["system"] == baseline}
    for r in rows:
        if (r["test"], r["batch"]) in base:
            r[f"vs_{baseline}"] = r["tok_s"] / base[(r["test"], r["batch"])]
