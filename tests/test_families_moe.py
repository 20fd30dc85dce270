"""Model families (issue 19): mixtures of experts. Mixtral (top-2 routing renormalized, Mistral's window) and
Qwen2-MoE (top-k without renormalization, a sigmoid-gated shared expert, q/k/v biases): tiny random models
built with transformers' own classes, served from their HF directories with greedy tokens equal to HF and
close logprobs on a mixed-length batch; quantized (every expert's projections, not the router) and split
over two ranks; the dense-among-sparse layouts we do not compute are refused with the key named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_families import LONG, hf_reference, serve
from tiny_models import build_models, write_gguf

from tuneserve import LLM, SamplingParams
from tuneserve.quant.linear import QuantLinear
from tuneserve.weights import open_checkpoint

MOE = dict(intermediate_size=64)  # multiples of 32: Q8_0 blocks
MODELS = {
    "mixtral": ("mixtral", None, dict(MOE, tie=False, num_local_experts=4, num_experts_per_tok=2, sliding_window=24),
                ("hf",)),
    "qwen2-moe": ("qwen2_moe", None, dict(MOE, tie=False, num_experts=6, num_experts_per_tok=3,
                                          moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                          norm_topk_prob=False), ("hf",)),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict]:
    return build_models(tmp_path_factory.mktemp("moe"), MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_and_logprobs_equal_hf(built, name):
    toks, lps = serve(built, name, "hf", LONG)
    ref_toks, ref_lps = hf_reference(built[name]["hf"], LONG)
    assert toks == ref_toks
    np.testing.assert_allclose(lps, ref_lps, atol=2e-4)


def test_the_config_is_read_as_hf_reads_it(built):
    m = open_checkpoint(built["mixtral"]["hf"]).arch_config()
    assert (m.num_experts, m.num_experts_per_tok, m.moe_intermediate_size, m.norm_topk_prob) == (4, 2, 64, True)
    assert m.layer_windows == (24, 24) and not m.attention_bias
    q = open_checkpoint(built["qwen2-moe"]["hf"]).arch_config()
    assert (q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size, q.norm_topk_prob) == (6, 3, 32, False)
    assert q.shared_expert_intermediate_size == 64 and q.attention_bias and not q.attention_out_bias


def test_int8_quantizes_every_expert_but_not_the_router(built):
    llm = LLM(str(built["qwen2-moe"]["hf"]), quantization="int8", kv_cache_memory_bytes=1 << 22)
    moe = llm.llm_engine.model.layers[0].mlp
    assert all(isinstance(e.gate_up_proj, QuantLinear) and isinstance(e.down_proj, QuantLinear) for e in moe.experts)
    assert isinstance(moe.shared_expert.down_proj, QuantLinear)
    assert not isinstance(moe.gate, QuantLinear) and not isinstance(moe.shared_expert_gate, QuantLinear)
    _close_to_hf(llm, built["qwen2-moe"]["hf"])


def _close_to_hf(llm: LLM, hf_dir) -> None:  # noqa: ANN001
    """The first step of a quantized model: HF's pick is in its top 5, at a logprob within 0.35 of HF's (a random
    tiny model has near ties that int8 may flip)."""
    outs = llm.generate(LONG, SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    ref, ref_lps = hf_reference(hf_dir, LONG)
    for o, r, lp in zip(outs, ref, ref_lps):
        top = dict(o.outputs[0].logprobs[0].top)
        assert r[0] in top and abs(top[r[0]] - lp[0]) < 0.35  # a wrongly packed expert is off by nats


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_ranks_equal_one(built, name):
    """Each expert splits like any MLP, summed once per layer (all ranks route alike: the router is replicated)."""
    path = str(built[name]["hf"])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    one = [o.outputs[0].token_ids for o in LLM(path, kv_cache_memory_bytes=1 << 22).generate(LONG, params)]
    llm = LLM(path, kv_cache_memory_bytes=1 << 22, tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(LONG, params)] == one
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("change,key", [({"mlp_only_layers": [0]}, "mlp_only_layers"),
                                        ({"decoder_sparse_step": 2}, "decoder_sparse_step")])
def test_dense_layers_among_sparse_ones_are_refused(built, tmp_path, change, key):
    cfg = json.loads((built["qwen2-moe"]["hf"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(ValueError, match=f"{key} = .*refusing"):
        open_checkpoint(tmp_path).arch_config()


def test_calibrated_quantization_is_refused_for_experts(built):
    with pytest.raises(ValueError, match="gptq calibration of a mixture-of-experts model is not supported"):
        LLM(str(built["mixtral"]["hf"]), quantization="gptq-int4", kv_cache_memory_bytes=1 << 22)


@pytest.fixture(scope="module")
def ggufs(built, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-gguf")
    return {(name, q): write_gguf(built[name]["hf"], root / f"{name}-{q}.gguf", qtype=None if q == "f32" else q)
            for name in MODELS for q in ("f32", "Q8_0")}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gguf_files_equal_hf(built, ggufs, name):
    """llama.cpp's layout (stacked ffn_*_exps, ffn_gate_inp, *_shexp), dequantized: equal to HF; served from
    its Q8_0 blocks (every expert a packed layer): the same first tokens."""
    hf = str(built[name]["hf"])
    llm = LLM(str(ggufs[(name, "f32")]), tokenizer=hf, quantization="none", kv_cache_memory_bytes=1 << 22)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = llm.generate(LONG, params, use_tqdm=False)
    ref_toks, ref_lps = hf_reference(built[name]["hf"], LONG)
    assert [o.outputs[0].token_ids for o in outs] == ref_toks
    np.testing.assert_allclose([[lp.logprob for lp in o.outputs[0].logprobs] for o in outs], ref_lps, atol=2e-4)
    q8 = LLM(str(ggufs[(name, "Q8_0")]), tokenizer=hf, kv_cache_memory_bytes=1 << 22)
    moe = q8.llm_engine.model.layers[1].mlp
    assert all(isinstance(e.gate_up_proj, QuantLinear) and isinstance(e.down_proj, QuantLinear) for e in moe.experts)
    _close_to_hf(q8, built[name]["hf"])
