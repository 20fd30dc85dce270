"""The performance peers run the engine's workload and report consistent figures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_KV_BYTES

from tuneserve.bench.peers import hf, llama_cpp
from tuneserve.bench.peers import sweep as peers_sweep
from tuneserve.bench.peers.compare import _add_ratios, peers_table
from tuneserve.bench.peers.result import make_result, peer_threads
from tuneserve.bench.records import load_records
from tuneserve.bench.workloads import Workload
from tuneserve.weights.sources import pull


def test_ratio_is_against_the_best_peer_of_the_same_workload():
    rows = [{"system": "tuneserve", "config": "max_num_seqs=64", "output_tok_s": 300.0},
            {"system": "tuneserve", "config": "ladder batch=1", "output_tok_s": 40.0},
            {"system": "hf", "config": "batch=8", "output_tok_s": 100.0},
            {"system": "llama.cpp", "config": "n_parallel=8", "output_tok_s": 150.0},
            {"system": "hf", "config": "ladder batch=1", "output_tok_s": 20.0}]
    _add_ratios(rows)
    assert rows[0]["ratio_vs_best_peer"] == 2.0 and rows[1]["ratio_vs_best_peer"] == 2.0


@pytest.mark.slow
@pytest.mark.model
def test_hf_peer_counts_tokens():
    prompts = [[100 + i] * (8 + i) for i in range(4)]
    (res,) = hf.run_hf(str(pull("smollm2-135m")), prompts, 5, batch_sizes=(4,))
    assert res.output_tokens == 20 and res.prompt_tokens == sum(map(len, prompts)) and res.output_tok_s > 0


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.skipif(not llama_cpp.is_available(), reason="llama-cpp-python missing: pip install -e .[peers]")
def test_llama_cpp_peer_counts_tokens():
    prompts = [[100 + i] * (8 + i) for i in range(4)]
    (res,) = llama_cpp.run_llama_cpp(str(pull("smollm2-135m")), prompts, 5, n_parallel=(2,))
    assert res.output_tokens == 20 and res.output_tok_s > 0
    assert res.threads == res.extra["n_threads"] == torch.get_num_threads()


def test_every_peer_runs_on_the_engines_thread_count(monkeypatch):
    threads = torch.get_num_threads()
    assert peer_threads() == threads and peer_threads(3) == 3
    with pytest.raises(ValueError, match="threads must be >= 1"):
        peer_threads(0)
    # llama.cpp: no longer pinned to 2 threads, it gets the engine's count unless told otherwise
    fake = SimpleNamespace(llama_model_default_params=lambda: SimpleNamespace(n_gpu_layers=99),
                           llama_model_load_from_file=lambda path, params: object(),
                           llama_model_get_vocab=lambda model: None, llama_vocab_n_tokens=lambda vocab: 100,
                           llama_model_free=lambda model: None)
    seen = []
    monkeypatch.setattr(llama_cpp, "_import_llama_cpp", lambda: fake)
    monkeypatch.setattr(llama_cpp, "_llama_workload", lambda *a: seen.append(a[7]) or a[7])
    assert llama_cpp.run_llama_cpp("m.gguf", [[1, 2]], 2, n_parallel=(1, 4)) == [threads, threads]
    assert llama_cpp.run_llama_cpp("m.gguf", [[1, 2]], 2, n_parallel=(1,), n_threads=1) == [1]


def test_hf_peer_computes_on_the_threads_it_is_given(tiny_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(hf, "_load_hf", lambda path: AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval())
    before = torch.get_num_threads()
    (res,) = hf.run_hf("unused.gguf", [[5, 6, 7], [8, 9]], 2, batch_sizes=(2,), threads=1)
    assert res.threads == 1 and res.extra["torch_threads"] == 1 and res.output_tokens == 4
    assert torch.get_num_threads() == before  # restored for the engine
    (res,) = hf.run_hf("unused.gguf", [[5, 6, 7]], 2, batch_sizes=(1,))
    assert res.threads == before


def test_thread_counts_are_in_the_table_and_every_peer_record(tmp_path, monkeypatch):
    rows = [{"system": "tuneserve", "config": "max_num_seqs=8", "threads": 2, "output_tok_s": 10.0},
            {"system": "hf-transformers", "config": "batch=8", "threads": 2, "output_tok_s": 5.0}]
    header, _, *lines = peers_table(rows, "t").splitlines()[1:]
    assert header.split()[:3] == ["system", "config", "threads"] and [ln.split()[2] for ln in lines] == ["2", "2"]
    monkeypatch.setattr("tuneserve.weights.sources.resolve", lambda m: "/x/m.gguf")
    monkeypatch.setattr("tuneserve.tokenizer.load_tokenizer", lambda p: None)
    monkeypatch.setattr(peers_sweep, "build_workload", lambda *a: Workload([[1, 2]], 2, "w"))
    monkeypatch.setattr(llama_cpp, "is_available", lambda: False)
    calls = []

    def fake_hf(path, prompts, out_len, sizes, threads=None):
        calls.append(threads)
        return [make_result("hf-transformers", f"batch={sizes[0]}", [2], [2], 1.0, [0.1], [0.1], {}, threads)]

    monkeypatch.setattr(hf, "run_hf", fake_hf)
    out = tmp_path / "r.jsonl"
    peers_sweep.sweep_peers("m", "corpus", str(out), 1, 2, batch_sizes=(1, 8))
    assert calls == [torch.get_num_threads()] * 2
    assert [r["metrics"]["threads"] for r in load_records(out)] == [torch.get_num_threads()] * 2


class _Clock:
    """perf_counter stand-in: each call is one second after the previous one."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def test_engine_pp_tg_counts_only_the_tokens_after_every_prompt(tiny_llama, monkeypatch):
    from tuneserve import LLM
    from tuneserve.bench.peers import pp_tg

    llm = LLM(str(tiny_llama), max_model_len=128, kv_cache_memory_bytes=TINY_KV_BYTES)
    plan = pp_tg.PpTgPlan(pp_len=40, tg_len=5, prompt_len=8, batches=(1, 3), reps=2)
    monkeypatch.setattr(pp_tg, "_clock", _Clock())  # two readings per run: one "second" apart
    rows = [r.to_dict() for r in pp_tg.engine_pp_tg(llm, plan, threads=2)]
    assert [(r["test"], r["batch"], r["reps"]) for r in rows] == [("pp40", 1, 2), ("tg5", 1, 2), ("tg5", 3, 2)]
    assert [r["tok_s"] for r in rows] == [40.0, 5.0, 15.0]  # pp: 40 prompt tokens; tg: B x 5 decoded tokens
    eng = llm.llm_engine
    assert not eng.has_unfinished_requests() and eng.kv.num_blocks_in_use == 0


def test_pp_tg_ratios_are_against_llama_cpp_on_the_same_test_and_batch():
    from tuneserve.bench.peers.pp_tg import add_ratios

    rows = [{"system": "tuneserve", "test": "tg64", "batch": 1, "tok_s": 150.0},
            {"system": "tuneserve", "test": "tg64", "batch": 8, "tok_s": 400.0},
            {"system": "llama.cpp", "test": "tg64", "batch": 1, "tok_s": 100.0},
            {"system": "hf-transformers", "test": "pp512", "batch": 1, "tok_s": 90.0}]
    add_ratios(rows)
    assert rows[0]["vs_llama.cpp"] == 1.5 and rows[2]["vs_llama.cpp"] == 1.0
    assert "vs_llama.cpp" not in rows[1] and "vs_llama.cpp" not in rows[3]


def test_hf_pp_tg_times_generation_after_the_first_token(tiny_dirs, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tuneserve.bench.peers.pp_tg import PpTgPlan

    monkeypatch.setattr(hf, "_load_hf", lambda path: AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).eval())
    monkeypatch.setattr(hf, "_clock", _Clock())
    plan = PpTgPlan(pp_len=16, tg_len=4, prompt_len=6, batches=(2,), reps=1)
    pp, tg = (r.to_dict() for r in hf.hf_pp_tg("unused.gguf", plan, threads=1))
    assert (pp["test"], pp["tok_s"], pp["threads"]) == ("pp16", 16.0, 1)  # 16 tokens between two readings
    assert (tg["test"], tg["batch"], tg["tok_s"]) == ("tg4", 2, 2.0)  # 2 x 4 tokens over 4 token gaps


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.skipif(not llama_cpp.is_available(), reason="llama-cpp-python missing: pip install -e .[peers]")
def test_llama_cpp_pp_tg_runs_every_test():
    from tuneserve.bench.peers.pp_tg import PpTgPlan

    plan = PpTgPlan(pp_len=64, tg_len=4, prompt_len=8, batches=(1, 4), reps=2)
    rows = [r.to_dict() for r in llama_cpp.llama_pp_tg(str(pull("smollm2-135m")), plan, n_threads=1)]
    assert [(r["test"], r["batch"], r["threads"]) for r in rows] == [("pp64", 1, 1), ("tg4", 1, 1), ("tg4", 4, 1)]
    assert all(r["tok_s"] > 0 and r["reps"] == 2 for r in rows)


def test_pp_tg_rounds_take_turns_on_new_prompts_and_merge_their_runs(monkeypatch):
    """--rounds: each round runs every system once (engine, HF, llama.cpp) on that round's prompts, then
    measures the machine's limits; a row holds every round's runs, the limits are the rounds' mean."""
    from types import SimpleNamespace

    from tuneserve.bench.peers import compare, pp_tg

    calls = []

    def fake(system):
        def run(_first, plan, _threads):
            calls.append((system, plan.seed, plan.prompts(0, 1, 4, 1000)[0]))
            return [pp_tg.PpTgRow(system, "tg8", 1, 2, [10.0 + plan.seed])]
        return run

    monkeypatch.setattr(compare, "engine_pp_tg", fake("tuneserve"))
    monkeypatch.setattr(compare.hf, "hf_pp_tg", fake("hf-transformers"))
    monkeypatch.setattr(compare.llama_cpp, "llama_pp_tg", fake("llama.cpp"))
    monkeypatch.setattr(compare.llama_cpp, "is_available", lambda: True)
    measured = iter([compare.ceilings.Ceilings(10e9, 100e9, 2), compare.ceilings.Ceilings(20e9, 300e9, 2)])
    monkeypatch.setattr(compare.ceilings, "measure", lambda threads: next(measured))
    ns = SimpleNamespace(rounds=2, hf_batch_sizes="1", llama_parallel="1")
    rows, limits = compare._pp_tg_rounds(ns, None, "m.gguf", pp_tg.PpTgPlan(tg_len=8, batches=(1,), reps=1), 2)
    assert limits == compare.ceilings.Ceilings(15e9, 200e9, 2)  # measured in each round, their mean
    assert [(c[0], c[1]) for c in calls] == [("tuneserve", 0), ("hf-transformers", 0), ("llama.cpp", 0),
                                             ("tuneserve", 1), ("hf-transformers", 1), ("llama.cpp", 1)]
    assert calls[0][2] == calls[1][2] == calls[2][2] != calls[3][2]  # same prompts within a round, new across
    assert [(r.system, r.runs) for r in rows] == [("tuneserve", [10.0, 11.0]), ("hf-transformers", [10.0, 11.0]),
                                                  ("llama.cpp", [10.0, 11.0])]
    assert rows[0].to_dict()["reps"] == 2
