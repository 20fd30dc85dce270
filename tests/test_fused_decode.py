"""The fused decode step (models/fused_decode.py, csrc/decode_step.c) on == off: served with the default
kernels (decode steps in one compiled call) and with kernels="unfused" (the same compiled kernels called op
by op), every llama-family variant gives the same greedy tokens and logprobs within fp32 tolerance, with
the fused call really made; steps it does not take (prompt chunks, too many rows, other families) run
the layers one by one."""

from __future__ import annotations

import random

import pytest
from conftest import TINY_KV_BYTES
from tiny_models import build_family

from tuneserve import LLM, SamplingParams
from tuneserve.kernels import decode_step
from tuneserve.kernels.config import resolve
from tuneserve.kernels.quant_ops import VNNI_DECODE_MAX_M, VNNI_MAX_M, int8_kernels_available, large_m

pytestmark = pytest.mark.skipif(resolve().decode != "fused", reason="the fused decode step is not built here")

LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": 32, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(6)], "long_factor": [1.0 + 0.7 * i for i in range(6)]}
VARIANTS = {  # name -> (family, rope, build_family keywords)
    "llama-tied": ("llama", None, {}),
    "llama-bias-untied": ("llama", None, dict(tie=False, attention_bias=True, seed=1)),
    "qwen3-qk-norm": ("qwen3", None, dict(head_dim=24, seed=2)),
    "mistral-window": ("mistral", None, dict(tie=False, sliding_window=24, seed=3)),
    "phi3-partial-rotary": ("phi3", LONGROPE, dict(max_pos=128, tie=False, original_max_position_embeddings=32)),
    "gemma3-four-norms": ("gemma3", None, dict(head_dim=16, sliding_window=24, query_pre_attn_scalar=16,
                                               layer_types=["sliding_attention", "full_attention"])),
}
REFUSED = {  # soft-capped attention; routed experts
    "gemma2-softcap": ("gemma2", None, dict(head_dim=16, sliding_window=24, attn_logit_softcapping=5.0,
                                            query_pre_attn_scalar=16, embed_scale=0.15)),
    "qwen2-moe": ("qwen2_moe", None, dict(intermediate_size=64, tie=False, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, shared_expert_intermediate_size=64)),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    models = {**VARIANTS, **REFUSED}
    return {name: build_family(root / name, fam, rope, **kw) for name, (fam, rope, kw) in models.items()}


def prompts(lengths, seed=0):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [0] + [rng.randrange(3, 259) for _ in range(n - 1)]} for n in lengths]


def spy(monkeypatch) -> list[int]:
    """Rows of every fused call from now on."""
    rows, real = [], decode_step.run
    monkeypatch.setattr(decode_step, "run", lambda m, g, pos, x: rows.append(x.shape[0]) or real(m, g, pos, x))
    return rows


def generate(path, reqs, params, **kw):
    return LLM(str(path), max_model_len=128, kv_cache_memory_bytes=TINY_KV_BYTES, **kw).generate(
        reqs, params, use_tqdm=False)


def assert_same(got, want, tol=1e-4):
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert abs(a.logprob - b.logprob) < tol


GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=2)


@pytest.mark.parametrize("name", VARIANTS)
def test_fused_equals_op_by_op(dirs, name, monkeypatch):
    reqs = prompts((5, 30, 70))  # a mixed batch; the windowed ones decode past their 24-token window
    want = generate(dirs[name], reqs, GREEDY, quantization="none", kernels="unfused")
    rows = spy(monkeypatch)
    got = generate(dirs[name], reqs, GREEDY, quantization="none")
    assert_same(got, want)
    assert rows and max(rows) == 3  # the decode steps of all three went through the fused call


@pytest.mark.parametrize("act", ["fp32", "int8"])
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_fused_equals_op_by_op_on_quantized_weights(dirs, quantization, act, monkeypatch):
    """With int8 activations the two paths agree only up to the rounding of x: the fused step's C norms differ
    from torch's in the last bit, and a last bit can move an input across an int8 rounding boundary (one step
    is 1/127 of its block's largest value), which moves a logprob by ~1e-2, not 1e-4, and can break a near-tie
    of this tiny random model's greedy tokens the other way."""
    reqs = prompts((9, 33), seed=4)
    kw = {"quantization": quantization, "quant_activations": act}
    want = generate(dirs["llama-bias-untied"], reqs, GREEDY, kernels="unfused", **kw)
    rows = spy(monkeypatch)
    got = generate(dirs["llama-bias-untied"], reqs, GREEDY, **kw)
    if act == "fp32":
        assert_same(got, want)
    else:
        assert_same_until_a_near_tie(got, want, tol=3e-2)
    assert rows


def assert_same_until_a_near_tie(got, want, tol):
    """Equal tokens and logprobs within tol, up to a step where the reference's top two were within 2 * tol (a
    tie the paths' rounding may break either way; the sequences differ from there on)."""
    for g, w in zip(got, want):
        for tg, tw, a, b in zip(g.outputs[0].token_ids, w.outputs[0].token_ids, g.outputs[0].logprobs,
                                w.outputs[0].logprobs):
            if tg != tw:
                (_, first), (_, second) = b.top[:2]
                assert first - second < 2 * tol, f"token {tg} != {tw} where the top two were {first - second} apart"
                break
            assert abs(a.logprob - b.logprob) < tol


def test_speculative_verification_rows_run_fused(dirs, monkeypatch):
    """ngram drafts: each verification step is k + 1 short query rows per request."""
    reqs = prompts((20, 41), seed=5)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    want = generate(dirs["llama-tied"], reqs, GREEDY, quantization="none", kernels="unfused")
    rows = spy(monkeypatch)
    got = generate(dirs["llama-tied"], reqs, GREEDY, quantization="none", speculative_config=spec)
    assert_same(got, want)
    assert any(r > 2 for r in rows)  # some step verified drafts


def test_batches_past_the_kernels_rows_run_op_by_op(dirs, monkeypatch):
    """int4 linears take fewer than large_m rows in the small-batch kernel (16, 64 on AVX2-only CPUs), fewer than
    the fused step's int8 limit in the int8 one (VNNI_DECODE_MAX_M with AVX-512 VNNI, else VNNI_MAX_M): a decode
    of 4 more requests than both runs layer by layer (short prompts: one prefill step, then every decode step
    has them all)."""
    n = max(large_m(resolve()), _fused_int8_rows()) + 4
    reqs = prompts([4 + i % 3 for i in range(n)], seed=6)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = generate(dirs["llama-tied"], reqs, params, quantization="int4", kernels="unfused", max_num_seqs=n)
    rows = spy(monkeypatch)
    got = generate(dirs["llama-tied"], reqs, params, quantization="int4", max_num_seqs=n)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert rows == []


def _fused_int8_rows() -> int:
    return VNNI_DECODE_MAX_M if resolve().features.avx512_vnni else VNNI_MAX_M


@pytest.mark.skipif(not (int8_kernels_available() and resolve().features.avx512_vnni),
                    reason="the fused step's own int8 limit is for AVX-512 VNNI's row-lane kernels")
def test_decode_steps_past_the_layers_int8_limit_run_fused_in_int8(dirs, monkeypatch):
    """Decode steps of VNNI_MAX_M..VNNI_DECODE_MAX_M - 1 rows take the fused step's int8 kernels, where a layer
    run on its own (prompt chunks) takes the bf16 tiles: with int8 activations everywhere (int8-all, so the
    prefill rounds alike) the fused steps equal the layers op by op, and steps of more than VNNI_MAX_M rows
    were fused."""
    n = VNNI_MAX_M + 4
    reqs = prompts([4 + i % 3 for i in range(n)], seed=7)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)
    kw = {"quantization": "int4", "quant_activations": "int8-all", "max_num_seqs": n}
    want = generate(dirs["llama-tied"], reqs, params, kernels="unfused", **kw)
    rows = spy(monkeypatch)
    got = generate(dirs["llama-tied"], reqs, params, **kw)
    assert_same_until_a_near_tie(got, want, tol=3e-2)
    assert max(rows) == n
    rows.clear()
    generate(dirs["llama-tied"], reqs, params, quantization="int4", max_num_seqs=n)  # the default int8 mode
    assert max(rows) == n


@pytest.mark.parametrize("name", REFUSED)
def test_layers_the_step_does_not_compute_refuse_and_run_one_by_one(dirs, name, monkeypatch):
    reqs, params = prompts((7, 12)), SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    want = generate(dirs[name], reqs, params, quantization="none", kernels="unfused")
    rows = spy(monkeypatch)
    llm = LLM(str(dirs[name]), max_model_len=128, quantization="none", kv_cache_memory_bytes=TINY_KV_BYTES)
    got = llm.generate(reqs, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    fused = llm.llm_engine.model.fused
    assert rows == [] and fused is not None and fused._refused  # noqa: SLF001 - the refusal is the point


@pytest.mark.parametrize(("name", "decode"), [("llama-tied", "fused"), ("gemma3-four-norms", "fused"),
                                              ("gemma2-softcap", "layers(soft-capping)"),
                                              ("qwen2-moe", "layers(SparseMoE MLP)")])
def test_the_start_up_line_says_what_decode_steps_run(dirs, name, decode, capsys, monkeypatch):
    import torch

    from tuneserve.loading import load_model
    from tuneserve.weights import open_checkpoint

    monkeypatch.delenv("TUNESERVE_QUIET", raising=False)
    path = str(dirs[name])
    capsys.readouterr()
    load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False, kernels=resolve())
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "kernels:" in ln)
    assert f" decode={decode} " in line
    load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), "bfloat16", progress=False,
               kernels=resolve())
    line = next(ln for ln in capsys.readouterr().err.splitlines() if "kernels:" in ln)
    assert " decode=layers(dtype bfloat16) " in line


@pytest.mark.parametrize("act", ["fp32", "int8"])
def test_fused_equals_op_by_op_on_gguf_int5_blocks(dirs, act, tmp_path, monkeypatch):
    """A Q5_0 file's matrices are served as int5 (the q4 kernels and the high bits): both paths agree, as on int4."""
    from tiny_models import write_gguf

    from tuneserve.quant.linear import QuantLinear

    hf = dirs["llama-bias-untied"]
    path = write_gguf(hf, tmp_path / "q5.gguf", qtype="Q5_0")
    reqs = prompts((9, 33), seed=5)
    kw = {"tokenizer": str(hf), "quant_activations": act}
    want = generate(path, reqs, GREEDY, kernels="unfused", **kw)
    rows = spy(monkeypatch)
    llm = LLM(str(path), max_model_len=128, kv_cache_memory_bytes=TINY_KV_BYTES, **kw)
    layers = [m for m in llm.llm_engine.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bits == 5 for m in layers)
    got = llm.generate(reqs, GREEDY, use_tqdm=False)
    if act == "fp32":
        assert_same(got, want)
    else:
        assert_same_until_a_near_tie(got, want, tol=3e-2)
    assert rows
