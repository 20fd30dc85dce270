"""bench peers' limits: what a step reads and multiplies, from the GGUF file, and each row's fractions."""

from __future__ import annotations

import math

import pytest
from safetensors.numpy import load_file
from tiny_models import write_gguf

from tuneserve.bench.peers.ceilings import Ceilings, ModelCosts, add_fractions, gguf_costs, measure


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_costs_count_every_matrix_and_read_the_embedding_only_as_a_tied_head(tiny_dirs, tmp_path, arch):
    path = write_gguf(tiny_dirs[arch], tmp_path / "m.gguf")
    state = load_file(str(tiny_dirs[arch] / "model.safetensors"))
    tied = arch == "llama"  # the tiny llama ties its head to the embedding; the tiny qwen2 does not
    h, inter, layers, heads, kv, hd, vocab = 64, 128, 2, 4, 2, 16, 272
    per_layer = h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * inter
    costs = gguf_costs(str(path))
    assert costs.matmul_params == layers * per_layer + vocab * h
    read = sum(v.size for k, v in state.items() if tied or k != "model.embed_tokens.weight") * 4
    assert costs.bytes_per_step == read
    assert costs.attn_flops_per_ctx == 4 * layers * heads * hd
    assert costs.kv_bytes_per_ctx == 2 * layers * kv * hd * 4


def test_fractions_divide_what_a_row_moves_by_the_limits():
    costs = ModelCosts(bytes_per_step=1000, matmul_params=100, attn_flops_per_ctx=2, kv_bytes_per_ctx=3)
    limits = Ceilings(bandwidth=10_000.0, compute=1_000_000.0, threads=2)
    rows = [{"test": "pp512", "batch": 1, "tok_s": 50.0}, {"test": "tg64", "batch": 1, "tok_s": 4.0},
            {"test": "tg64", "batch": 8, "tok_s": 20.0}]
    add_fractions(rows, costs, limits, pp_len=512, prompt_len=64, tg_len=64)
    pp, tg1, tg8 = rows
    assert math.isclose(pp["bw_frac"], 50 * (1000 / 512 + 3 * 256) / 10_000)
    assert math.isclose(pp["compute_frac"], 50 * (200 + 2 * 256) / 1_000_000)
    assert math.isclose(tg1["bw_frac"], 4 * (1000 + 3 * 96) / 10_000)
    assert math.isclose(tg8["bw_frac"], 20 * (1000 / 8 + 3 * 96) / 10_000)
    assert math.isclose(tg8["compute_frac"], 20 * (200 + 2 * 96) / 1_000_000)


def test_measured_limits_are_plausible_for_a_cpu():
    lim = measure(1)
    assert 5e8 < lim.bandwidth < 5e12 and 1e8 < lim.compute < 1e14 and lim.threads == 1
    assert "GB/s" in lim.describe() and "GFLOP/s" in lim.describe()
