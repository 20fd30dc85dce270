"""Model families (issue 19): Gemma 2 (attention and final logit soft-capping, alternating sliding / global
layers, four norms with gemma's +1, query_pre_attn_scalar) and Phi-3 (fused qkv_proj / gate_up_proj, longrope,
partial rotary, a window on every layer): tiny random models built with transformers' own classes, served
from HF directories and llama.cpp-style GGUF files with greedy tokens equal to HF and close logprobs, on
mixed-length batches past the window and the original context; what we would compute differently is
refused with the key named."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_families import LONG, ORIG, PAST, SHORT, hf_reference, serve
from tiny_models import build_models, round_trip_configs, write_gguf

from tuneserve.kernels import attention as A
from tuneserve.models.layers import Attention
from tuneserve.models.loader import build_model
from tuneserve.weights import open_checkpoint
from tuneserve.weights.gguf_arch import arch_from_gguf
from tuneserve.weights.hf_arch import arch_from_hf

# Phi-4-mini style: longrope over the 12 rotating dims of 16 (partial_rotary_factor 0.75)
LONGROPE = {"rope_type": "longrope", "original_max_position_embeddings": ORIG, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(6)], "long_factor": [1.0 + 0.7 * i for i in range(6)]}
# small caps so tanh bends the scores and logits; tied embeddings scaled down so tokens vary (tiny_models)
GEMMA2 = dict(head_dim=16, sliding_window=24, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
              embed_scale=0.15)
# name -> (family, rope_parameters, build_family keywords, paths served)
MODELS = {
    # HF's default layer types (sliding, full, sliding); GGUF has no query_pre_attn_scalar: head_dim it is
    "gemma2": ("gemma2", None, dict(GEMMA2, layers=3, query_pre_attn_scalar=16), ("hf", "gguf")),
    "gemma2-types": ("gemma2", None, dict(GEMMA2, seed=1, query_pre_attn_scalar=24,
                                          layer_types=["full_attention", "sliding_attention"]), ("hf",)),
    "phi3": ("phi3", LONGROPE, dict(max_pos=128, tie=False, sliding_window=24, original_max_position_embeddings=ORIG),
             ("hf", "gguf")),
}
CASES = [(name, path) for name, (*_, paths) in MODELS.items() for path in paths]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("families2")
    out = build_models(root, MODELS)
    out["phi3-q8"] = {"hf": out["phi3"]["hf"], "gguf": write_gguf(out["phi3"]["hf"], root / "q8.gguf", qtype="Q8_0")}
    return out


@pytest.mark.parametrize("name,path", CASES)
def test_greedy_and_logprobs_equal_hf(built, name, path):
    ids = PAST if name == "phi3" else LONG  # longrope served past ORIG: HF's long factors need prompts past it
    toks, lps = serve(built, name, path, ids)
    ref_toks, ref_lps = hf_reference(built[name]["hf"], ids)
    assert toks == ref_toks
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-4, rtol=0)


@pytest.mark.parametrize("path", ["hf", "gguf"])
def test_phi3_within_the_original_context_uses_the_short_factors(built, path):
    toks, lps = serve(built, "phi3", path, SHORT, max_model_len=ORIG)
    ref_toks, ref_lps = hf_reference(built["phi3"]["hf"], SHORT)
    assert toks == ref_toks
    torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-4, rtol=0)


def test_phi3_gguf_blocks_served_natively_equal_the_file_dequantized(built):
    """quantization auto keeps a GGUF's Q8_0 blocks, the fused attn_qkv and ffn_up too (quant/gguf_native.py)."""
    # int8 activations (the default on VNNI CPUs) would round x too; this compares the weights alone
    native = serve(built, "phi3-q8", "gguf", PAST, quant_activations="fp32")
    plain = serve(built, "phi3-q8", "gguf", PAST, quantization="none")
    assert native[0] == plain[0]
    torch.testing.assert_close(torch.tensor(native[1]), torch.tensor(plain[1]), atol=1e-4, rtol=0)


def test_configs_from_both_paths_and_a_quantized_save(built):
    g = open_checkpoint(built["gemma2"]["hf"]).arch_config()
    assert (g.layer_windows, g.query_pre_attn_scalar, g.hidden_act) == ((24, 0, 24), 16.0, "gelu_tanh")
    assert (g.attn_logit_softcapping, g.final_logit_softcapping, g.tie_word_embeddings) == (5.0, 3.0, True)
    assert open_checkpoint(built["gemma2-types"]["hf"]).arch_config().layer_windows == (0, 24)
    p = open_checkpoint(built["phi3"]["hf"]).arch_config()
    assert (p.rotary_dim, p.layer_windows, p.attention_bias) == (12, (24, 24), False)
    assert (p.rope_scaling.rope_type, p.rope_scaling.factor, p.rope_scaling.original_max_position_embeddings) == (
        "longrope", 4.0, ORIG)
    for name, d in built.items():
        if name == "phi3-q8":
            continue
        hf, gg = round_trip_configs(d)
        if gg is None:
            continue
        rope = hf.rope_scaling  # the GGUF's longrope factors went through fp32
        assert gg.rope_scaling.long_factor == pytest.approx(rope.long_factor)
        assert dataclasses.replace(gg, rms_norm_eps=hf.rms_norm_eps, rope_scaling=rope) == hf


def test_softcapped_attention_never_takes_the_compiled_kernel(built, monkeypatch):
    """The cap on the portable path equals the written-out math, whatever `compiled` asks; layers of a
    softcapped model are bound to the torch path."""
    from tuneserve.kernels.config import KernelConfig

    arch = open_checkpoint(built["gemma2"]["hf"]).arch_config()
    model = build_model(arch, torch.device("cpu"))
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kernels(KernelConfig(attention="compiled"))
            assert m.compiled_attention is False
    monkeypatch.setattr(A, "short_attention_c", lambda *a: pytest.fail("compiled kernel with a softcap"))
    g, hkv, grp, d, bs, cap = torch.Generator().manual_seed(0), 2, 2, 16, 4, 2.0
    seqs = [(9, 1, [1, 2, 3]), (0, 20, [4, 5, 6, 7, 8]), (5, 3, [9, 10])]  # a decode, a fresh prompt, a tail
    kc, vc = torch.randn(11, bs, hkv, d, generator=g), torch.randn(11, bs, hkv, d, generator=g)
    n = sum(s[1] for s in seqs)
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hkv * grp, hkv, hkv))
    meta = A.build_metadata(seqs, bs, torch.device("cpu"), window=6)
    out = A.paged_attention(q, k, v, kc, vc, meta, scale=0.5, compiled=True, softcap=cap)
    row = 0
    for start, num, table in seqs:
        keys = kc[table].flatten(0, 1)[:start + num].repeat_interleave(grp, 1).transpose(0, 1)  # (H, T, D)
        vals = vc[table].flatten(0, 1)[:start + num].repeat_interleave(grp, 1).transpose(0, 1)
        s = q[row:row + num].transpose(0, 1) @ keys.transpose(1, 2) * 0.5
        qpos, kpos = torch.arange(start, start + num)[:, None], torch.arange(start + num)
        s = (torch.tanh(s / cap) * cap).masked_fill((kpos > qpos) | (kpos <= qpos - 6), float("-inf"))
        ref = (s.softmax(-1) @ vals).transpose(0, 1)
        torch.testing.assert_close(out[row:row + num], ref, atol=1e-5, rtol=1e-4)
        row += num


# ----- config spellings and what we refuse -------------------------------------------------------------
def _cfg(built, name: str, **change) -> dict:
    return {**json.loads((built[name]["hf"] / "config.json").read_text()), **change}


def test_phi3_rope_spellings_read_as_hf_reads_them(built):
    base = arch_from_hf(_cfg(built, "phi3"), "x")
    rp = {k: v for k, v in _cfg(built, "phi3")["rope_parameters"].items()
          if k not in ("rope_type", "partial_rotary_factor")}
    for kind in ("su", "longrope", "yarn"):  # Phi3Config: su and yarn are longrope
        old = _cfg(built, "phi3", rope_parameters=None, rope_scaling={"type": kind, **rp}, partial_rotary_factor=0.75)
        assert arch_from_hf(old, "x") == base
    assert arch_from_hf(_cfg(built, "phi3", rope_parameters={"rope_theta": 1e4}), "x").rotary_dim == 0


REFUSED_HF = [
    ("phi3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters.rope_type", "'linear'"),
    ("phi3", {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.7}}, "partial_rotary_factor", "0.7"),
    ("phi3", {"hidden_act": "gelu"}, "hidden_act", "'gelu'"),
    ("gemma2", {"sliding_window": None}, "sliding_window", "None"),
    ("gemma2", {"hidden_activation": "silu"}, "hidden_activation", "'silu'"),
    ("gemma2", {"partial_rotary_factor": 0.5}, "partial_rotary_factor", "0.5"),
    # gemma3 and the llama family do not soft-cap (tests/test_families.py): gemma3 keeps refusing it
    ("gemma2", {"architectures": ["Gemma3ForCausalLM"]}, "attn_logit_softcapping", "5.0"),
]


@pytest.mark.parametrize("base,change,key,value", REFUSED_HF)
def test_hf_config_keys_we_do_not_compute_are_refused(built, tmp_path, base, change, key, value):
    with pytest.raises(ValueError, match="refusing") as e:
        arch_from_hf(_cfg(built, base, **change), str(tmp_path))
    assert f"{key} = " in str(e.value) and value in str(e.value)


def _meta(built, name: str, **change) -> tuple[dict, set[str], object]:
    ck = open_checkpoint(built[name]["gguf"])
    return {**ck.meta, **change}, set(ck.tensor_names), ck._small_tensor


REFUSED_GGUF = [
    ("gemma2", {"gemma2.attention.sliding_window": 0}, "gemma2.attention.sliding_window", "0"),
    ("gemma2", {"gemma2.rope.dimension_count": 8}, "gemma2.rope.dimension_count", "8"),
    ("phi3", {"phi3.rope.dimension_count": 11}, "phi3.rope.dimension_count", "11"),
    ("phi3", {"phi3.attn_logit_softcapping": 50.0}, "phi3.attn_logit_softcapping", "50.0"),
]


@pytest.mark.parametrize("base,change,key,value", REFUSED_GGUF)
def test_gguf_metadata_we_do_not_compute_is_refused(built, base, change, key, value):
    meta, names, read = _meta(built, base, **change)
    with pytest.raises(ValueError, match="refusing") as e:
        arch_from_gguf(meta, names, read, lambda: 272, "x")
    assert f"{key} = " in str(e.value) and value in str(e.value)


def test_gguf_gemma_attention_scale_follows_llama_cpp(built):
    """1/sqrt(head_dim), but 1/sqrt(hidden / heads) at the 27B's layer count; soft caps default to 50 / 30."""
    meta, names, read = _meta(built, "gemma2")
    del meta["gemma2.attn_logit_softcapping"], meta["gemma2.final_logit_softcapping"]
    arch = arch_from_gguf({**meta, "gemma2.attention.key_length": 8, "gemma2.attention.value_length": 8,
                           "gemma2.rope.dimension_count": 8}, names, read, lambda: 272, "x")
    assert (arch.query_pre_attn_scalar, arch.attn_logit_softcapping, arch.final_logit_softcapping) == (8, 50, 30)
    big = arch_from_gguf({**meta, "gemma2.block_count": 46, "gemma2.attention.key_length": 8,
                          "gemma2.attention.value_length": 8, "gemma2.rope.dimension_count": 8}, names, read,
                         lambda: 272, "x")
    assert big.query_pre_attn_scalar == 64 // 4 and big.layer_windows[:3] == (24, 0, 24)
