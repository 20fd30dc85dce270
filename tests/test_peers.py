"""The performance peers run the engine's workload and report consistent figures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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
