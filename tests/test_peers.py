"""The performance peers run the engine's workload and report consistent figures."""

from __future__ import annotations

import pytest

from tuneserve.bench.peers import hf, llama_cpp
from tuneserve.bench.peers.compare import _add_ratios
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
