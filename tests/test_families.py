"""Model families (issue 19): Llama 3.x, Qwen3, Mistral and every rope scaling variant, each a tiny random
model built with transformers' own classes, served from its HF directory and from a llama.cpp-style GGUF
file with greedy tokens equal to HF transformers and close logprobs, past the original context where
the variant scales; configs we would compute differently are refused with the key named."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch
from tiny_models import build_models, round_trip_configs, write_gguf
from transformers import AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tuneserve import LLM, SamplingParams
from tuneserve.models.loader import build_model, load_weights
from tuneserve.models.rope import rope_frequencies
from tuneserve.weights import open_checkpoint
from tuneserve.weights.hf_arch import arch_from_hf

ORIG = 32  # original context of the scaled variants; prompts and generations run past it
N_NEW = 12
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIG}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG}
LINEAR = {"rope_type": "linear", "factor": 2.0}
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": ORIG,
            "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)]}

# name -> (family, rope_parameters, build_family keywords, paths served)
MODELS = {
    "llama3-tied": ("llama", LLAMA3, {}, ("hf", "gguf")),
    "llama3-untied-bias": ("llama", LLAMA3, dict(tie=False, attention_bias=True, seed=1), ("hf", "gguf")),
    "qwen3-yarn": ("qwen3", YARN, dict(max_pos=128, head_dim=24), ("hf", "gguf")),
    "qwen3-window": ("qwen3", None, dict(tie=False, head_dim=24, use_sliding_window=True, sliding_window=24,
                                         max_window_layers=1), ("hf",)),
    "mistral-linear": ("mistral", LINEAR, dict(tie=False, sliding_window=24), ("hf", "gguf")),
    "llama-longrope": ("llama", LONGROPE, dict(max_pos=128), ("hf", "gguf")),
    "llama-dynamic": ("llama", DYNAMIC, dict(max_pos=128), ("hf",)),
    "gemma3-linear": ("gemma3", LINEAR, dict(head_dim=16, sliding_window=24, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "full_attention"]), ("hf",)),
}
CASES = [(name, path) for name, (*_, paths) in MODELS.items() for path in paths]


def prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 259) for _ in range(n - 1)] for n in lengths]


LONG = prompts((5, 40, 90))  # a mixed batch: inside, across and far past the original context / window
SHORT = prompts((5, 12, 19), seed=1)  # + N_NEW stays within ORIG
# longrope's factor set is fixed by the served length (HF picks it per forward call): served past ORIG,
# prompts longer than ORIG are where HF uses the long set too
PAST = prompts((33, 60, 90), seed=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict]:
    return build_models(tmp_path_factory.mktemp("families"), MODELS)


_REFS: dict = {}


def hf_reference(d, ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """HF greedy tokens and their logprobs, one prompt at a time with HF's own KV cache."""
    key = (str(d), str(ids))
    if key not in _REFS:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
        toks, lps = [], []
        with torch.inference_mode():
            for p in ids:
                out, t_, l_ = model(torch.tensor([p]), use_cache=True), [], []
                for _ in range(N_NEW):
                    row = out.logits[0, -1].log_softmax(-1)
                    t = int(row.argmax())
                    t_.append(t)
                    l_.append(float(row[t]))
                    out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
                toks.append(t_)
                lps.append(l_)
        _REFS[key] = (toks, lps)
    return _REFS[key]


def serve(built, name: str, path: str, ids: list[list[int]], **kw) -> tuple[list[list[int]], list[list[float]]]:
    d = built[name]
    # small chunks and blocks: rope positions and windows cross chunk and block boundaries
    llm = LLM(str(d[path]), tokenizer=str(d["hf"]), kv_cache_memory_bytes=1 << 22, block_size=8,
              max_num_batched_tokens=48, **kw)
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=N_NEW, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    return ([o.outputs[0].token_ids for o in outs],
            [[lp.logprob for lp in o.outputs[0].logprobs] for o in outs])


@pytest.mark.parametrize("name,path", CASES)
def test_greedy_and_logprobs_equal_hf_past_the_original_context(built, name, path):
    ids = PAST if name == "llama-longrope" else LONG
    toks, lps = serve(built, name, path, ids)
    ref_toks, ref_lps = hf_reference(built[name]["hf"], ids)
    assert toks == ref_toks
    np.testing.assert_allclose(lps, ref_lps, atol=2e-4)


@pytest.mark.parametrize("path", ["hf", "gguf"])
def test_longrope_uses_the_short_factors_when_served_within_the_original_context(built, path):
    toks, lps = serve(built, "llama-longrope", path, SHORT, max_model_len=ORIG)
    ref_toks, ref_lps = hf_reference(built["llama-longrope"]["hf"], SHORT)
    assert toks == ref_toks
    np.testing.assert_allclose(lps, ref_lps, atol=2e-4)


def test_rope_frequencies_match_transformers():
    from transformers import LlamaConfig

    for rope in (LINEAR, DYNAMIC, YARN, LLAMA3, LONGROPE,
                 {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False}):
        c = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                        rope_parameters={"rope_theta": 500.0, **rope})
        arch = arch_from_hf({**c.to_dict(), "architectures": ["LlamaForCausalLM"]}, "x")
        for seq in (ORIG, 100):  # HF's dynamic and longrope look at the sequence length
            ref, att = ROPE_INIT_FUNCTIONS[rope["rope_type"]](c, "cpu", seq_len=seq)
            ours, our_att = rope_frequencies(16, 500.0, arch.rope_scaling, seq)
            torch.testing.assert_close(ours.float(), ref, rtol=1e-6, atol=0)
            assert our_att == pytest.approx(att)


def test_configs_read_the_same_from_both_paths_and_survive_a_quantized_save(built):
    for d in built.values():
        hf, gg = round_trip_configs(d)
        if gg is None:
            continue
        if gg.rope_scaling != hf.rope_scaling:  # llama3 as its divisors, longrope's in fp32: the same math
            for served in (ORIG, 128):
                ours, att = rope_frequencies(16, 1e4, gg.rope_scaling, served)
                ref, ref_att = rope_frequencies(16, 1e4, hf.rope_scaling, served)
                torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
                assert att == pytest.approx(ref_att)
            gg = dataclasses.replace(gg, rope_scaling=hf.rope_scaling)
        assert dataclasses.replace(gg, rms_norm_eps=hf.rms_norm_eps) == hf
    assert open_checkpoint(built["mistral-linear"]["gguf"]).arch_config().layer_windows == (24, 24)
    assert open_checkpoint(built["qwen3-window"]["hf"]).arch_config().layer_windows == (0, 24)


# ----- what we refuse ------------------------------------------------------------------------------------
REFUSED_HF = [
    ({"rope_parameters": {"rope_type": "ntk", "factor": 2.0}}, "rope_parameters.rope_type", "'ntk'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0, "mrope_section": [2, 2]}}, "rope_scaling.mrope_section",
     "[2, 2]"),
    ({"rope_parameters": {"rope_type": "linear"}}, "rope_parameters.factor", "None"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "0.5"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping", "30.0"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping", "50.0"),
    ({"num_local_experts": 8}, "num_local_experts", "8"),
    ({"num_experts": 4}, "num_experts", "4"),
    ({"hidden_act": "gelu"}, "hidden_act", "'gelu'"),
    ({"mlp_bias": True}, "mlp_bias", "True"),
    ({"architectures": ["Qwen3ForCausalLM"], "layer_types": ["full_attention", "chunked_attention"]}, "layer_types",
     "chunked_attention"),
]


@pytest.mark.parametrize("change,key,value", REFUSED_HF)
def test_hf_config_keys_we_do_not_compute_are_refused(built, tmp_path, change, key, value):
    cfg = json.loads((built["llama3-tied"]["hf"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(ValueError, match="refusing") as e:
        open_checkpoint(tmp_path).arch_config()
    assert f"{key} = " in str(e.value) and value in str(e.value)


REFUSED_GGUF = [
    ("llama-dynamic", {"llama.rope.scaling.type": "dynamic"}, "llama.rope.scaling.type", "'dynamic'"),
    ("llama-dynamic", {"llama.expert_count": 8}, "llama.expert_count", "8"),
    ("llama-dynamic", {"llama.final_logit_softcapping": 30.0}, "llama.final_logit_softcapping", "30.0"),
    ("llama-dynamic", {"llama.attn_logit_softcapping": 50.0}, "llama.attn_logit_softcapping", "50.0"),
    ("llama-dynamic", {"llama.rope.scaling.factor": 4.0}, "llama.rope.scaling.factor", "4.0"),
    ("qwen3-yarn", {"qwen3.attention.sliding_window": 24}, "qwen3.attention.sliding_window", "24"),
    ("qwen3-yarn", {"qwen3.rope.scaling.yarn_log_multiplier": 0.1}, "qwen3.rope.scaling.yarn_log_multiplier", "0.1"),
]


@pytest.mark.parametrize("base,meta,key,value", REFUSED_GGUF)
def test_gguf_metadata_we_do_not_compute_is_refused(built, tmp_path, base, meta, key, value):
    path = write_gguf(built[base]["hf"], tmp_path / "m.gguf", extra_meta=meta)
    with pytest.raises(ValueError, match="refusing") as e:
        open_checkpoint(path).arch_config()
    assert f"{key} = " in str(e.value) and value in str(e.value)


def test_tensors_the_model_would_not_load_are_errors(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = built["qwen3-yarn"]["hf"]
    extra = {"blk.0.attn_gate.weight": np.ones((4, 64), np.float32)}
    gguf = write_gguf(src, tmp_path / "m.gguf", extra_tensors=extra)
    hf = tmp_path / "hf"
    shutil.copytree(src, hf)
    state = load_file(str(hf / "model.safetensors"))
    save_file({**state, "model.layers.0.mlp.gate_proj.bias": np.ones(128, np.float32)}, str(hf / "model.safetensors"))
    for path, name in ((gguf, "attn_gate"), (hf, "gate_proj.bias")):
        arch = open_checkpoint(path).arch_config()
        with pytest.raises(ValueError, match=name):
            load_weights(build_model(arch, torch.device("cpu")), str(path), arch, progress=False)
