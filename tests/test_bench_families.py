"""`tuneserve bench families` on tiny shapes: both systems in the table, ratios from the figures, and greedy
tokens equal to HF's (so the speed figures compare like for like)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneserve.bench.family_models import Shape, count_params, family_config
from tuneserve.bench.records import fmt
from tuneserve.cli.main import main
from tuneserve.kernels.config import cpu_name

BATCHES, PROMPTS, OUT = (1, 3), (12, 6), 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("families") / "families.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["bench", "families", "--families", "gemma2,qwen2_moe", "--hidden-size", "64", "--layers", "2",
                   "--vocab-size", "512", "--batch", ",".join(map(str, BATCHES)),
                   "--prompt-len", ",".join(map(str, PROMPTS)), "--output-len", str(OUT), "--json", str(out)])
    assert rc == 0
    return buf.getvalue(), json.loads(out.read_text())


def test_every_family_and_batch_has_both_systems_and_equal_greedy_tokens(run):
    _, record = run
    rows = record["results"]
    assert [(r["family"], r["batch"], r["prompt_len"]) for r in rows] == [
        (f, b, n) for f in ("gemma2", "qwen2_moe") for b, n in zip(BATCHES, PROMPTS)]
    for r in rows:
        assert r["tuneserve_tokens"] == r["hf_tokens"] and r["same_tokens"] == 1.0
        assert [len(t) for t in r["tuneserve_tokens"]] == [OUT] * r["batch"]
        assert r["tuneserve_tok_s"] == r["batch"] * OUT / r["tuneserve_s"]
        assert r["hf_tok_s"] == r["batch"] * OUT / r["hf_s"]
        assert r["ratio"] == r["tuneserve_tok_s"] / r["hf_tok_s"]
    gemma2, moe = rows[0], rows[2]
    assert gemma2["hf_attn"] == "eager"  # HF's soft-capped attention: what its SDPA cannot compute
    assert gemma2["active_params"] == gemma2["params"] and moe["active_params"] < moe["params"]
    assert record["threads"] == torch.get_num_threads() and record["cpu"] == cpu_name()


def test_the_printed_table_shows_the_figures_and_their_ratio(run):
    out, record = run
    title, header, _, *cells = out.strip().splitlines()[-len(record["results"]) - 3:]
    assert title.startswith("bench families: output tok/s, tuneserve vs HF transformers")
    threads = record["threads"]
    assert f"; {threads} torch thread{'s' if threads > 1 else ''} each; CPU: {cpu_name()}" in title
    columns = header.split()
    assert columns[-4:] == ["tuneserve_tok_s", "hf_tok_s", "ratio", "same_tokens"]
    for line, r in zip(cells, record["results"]):
        row = dict(zip(columns, line.split()))
        assert (row["family"], row["batch"]) == (r["family"], str(r["batch"]))
        assert (row["tuneserve_tok_s"], row["hf_tok_s"]) == (fmt(r["tuneserve_tok_s"]), fmt(r["hf_tok_s"]))
        assert row["ratio"] == f"{r['tuneserve_tok_s'] / r['hf_tok_s']:.2f}" and row["same_tokens"] == "1.00"


def test_parameters_count_routed_experts_by_their_share():
    with torch.device("meta"):  # the benchmark's own scale, without allocating it
        cfg = family_config("mixtral", Shape())
        model = AutoModelForCausalLM.from_config(cfg)
    h, kv, experts = 1024, 512, 3 * 1024 * 1024  # hidden; k and v rows (8 heads of 64); one expert's weights
    shared = 2 * h * h + 2 * h * kv + 8 * h + 2 * h  # attention, router, two norms: every token uses them
    outside = 2 * 32000 * h + h  # untied embeddings and head, final norm
    assert count_params(model, cfg) == (24 * (shared + 8 * experts) + outside, 24 * (shared + 2 * experts) + outside)


def test_an_unknown_family_is_refused_by_name(capsys):
    assert main(["bench", "families", "--families", "llama,gpt2"]) == 2
    assert capsys.readouterr().err == ("error: unknown families ['gpt2']; choose from llama, qwen2, qwen3, mistral, "
                                       "gemma2, gemma3, phi3, mixtral, qwen2_moe\n")
