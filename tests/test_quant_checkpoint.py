"""Quantized checkpoints: ours reload to identical outputs (as model=DIR and quantization=DIR), and HF
GPTQ / AWQ directories load to the weights their format defines."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tuneserve import LLM, SamplingParams
from tuneserve.calibration.calibrate import fresh_context
from tuneserve.loading import load_model, quantize_with_recipe
from tuneserve.quant.checkpoint import quant_kind, save_quantized
from tuneserve.quant.linear import QuantLinear
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.tokenizer import load_tokenizer
from tuneserve.weights import open_checkpoint

TEXT = ("The quick brown fox jumps over the lazy dog. Quantization trades precision for memory and speed. "
        "A language model predicts the next token from the tokens before it. ") * 60
KV = 256 * 8192


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("corpus") / "calib.txt"
    p.write_text(TEXT)
    return str(p)


def _logits(model, ids):
    ctx = fresh_context(model.arch, [len(ids)], torch.device("cpu"), torch.float32)
    return model.compute_logits(model(torch.tensor(ids), ctx))


@pytest.mark.parametrize("method,bits,rounding", [("gptq", 4, "rtn"), ("awq", 4, "rtn"), ("awq", 4, "gptq"),
                                                   ("rtn", 8, "rtn")])
def test_saved_checkpoint_reloads_to_identical_outputs(tiny_dirs, corpus_file, tmp_path, method, bits, rounding):
    src = str(tiny_dirs["qwen2"])
    arch = open_checkpoint(src).arch_config()
    model = load_model(src, arch, torch.device("cpu"), progress=False)
    tok = load_tokenizer(src)
    spec = QuantRecipe(method=method, bits=bits, corpus=corpus_file, samples=4, seq_len=64, group_size=32,
                     awq_rounding=rounding)
    report = quantize_with_recipe(model, spec, src, progress=False, tokenizer=tok)
    out = save_quantized(model, tmp_path / "q", {"method": method, "bits": bits, "group_size": 32,
                                                 "source": src, "calibration": report["spec"]}, tok)
    assert quant_kind(out) == "tuneserve"
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["method"] == method and meta["modules"]["layers.0.mlp.down_proj"]["bits"] == bits
    ids = list(range(3, 40))
    want = _logits(model, ids)
    again = load_model(str(out), open_checkpoint(str(out)).arch_config(), torch.device("cpu"), progress=False)
    assert isinstance(again.layers[1].self_attn.qkv_proj, QuantLinear)
    if rounding == "gptq":  # AWQ's scales with GPTQ's act-order: a scaled layer keeps its input scale and order
        scaled = [m for layer in again.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
                  if m.input_scale is not None]
        assert scaled and all(m.perm is not None for m in scaled)
    torch.testing.assert_close(_logits(again, ids), want, rtol=0, atol=0)
    via_q = load_model(src, arch, torch.device("cpu"), progress=False, quantization=str(out))
    torch.testing.assert_close(_logits(via_q, ids), want, rtol=0, atol=0)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(str(out), kv_cache_memory_bytes=KV).generate([ids], params, use_tqdm=False)
    a = a[0].outputs[0].token_ids
    b = LLM(src, quantization=str(out), kv_cache_memory_bytes=KV).generate([ids], params, use_tqdm=False)
    assert a == b[0].outputs[0].token_ids


# ----- HF layouts, packed here from the format descriptions (independently of hf_import) -------------
def _pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """(K, N) unsigned values -> int32 (K * bits / 32, N); value j of a word sits at bit bits * j."""
    per = 32 // bits
    k, n = vals.shape
    v = vals.to(torch.int64).view(k // per, per, n)
    word = sum(v[:, j] << (bits * j) for j in range(per))
    return (word - ((word >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def _pack_cols(vals: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """(R, N) -> int32 (R, N * bits / 32) packed along N; with order, nibble i holds column order[i]."""
    per = 32 // bits
    r, n = vals.shape
    v = vals.to(torch.int64).view(r, n // per, per)
    if order is not None:
        v = v[:, :, list(order)]
    word = sum(v[:, :, j] << (bits * j) for j in range(per))
    return (word - ((word >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def _hf_quantized(plain: dict, kind: str, group: int) -> tuple[dict, dict]:
    """Every layer matrix of `plain` replaced by random codes in the HF `kind` layout: (the checkpoint's
    tensors, {module: the (N, K) weight its format defines})."""
    g = torch.Generator().manual_seed(0)
    tensors, expect = {}, {}
    for name, w in plain.items():
        if not name.endswith(".weight") or "layers" not in name or "norm" in name:
            tensors[name] = w
            continue
        n, k = w.shape
        base = name.removesuffix(".weight")
        q = torch.randint(0, 16, (k, n), generator=g)
        z = torch.randint(1, 16, (k // group, n), generator=g)  # GPTQ v1 cannot store a zero point of 0
        s = (torch.rand(k // group, n, generator=g) * 0.05 + 0.01).half()
        g_idx = torch.arange(k) // group
        if kind == "gptq-act-order":
            g_idx = g_idx[torch.randperm(k, generator=g)]
        expect[base] = ((q - z[g_idx]).float() * s.float()[g_idx]).t()  # (N, K)
        if kind == "awq":
            order = (0, 2, 4, 6, 1, 3, 5, 7)
            tensors.update({f"{base}.qweight": _pack_cols(q, 4, order),
                            f"{base}.qzeros": _pack_cols(z, 4, order), f"{base}.scales": s})
        else:  # GPTQ v1 stores zero - 1
            tensors.update({f"{base}.qweight": _pack_rows(q, 4), f"{base}.qzeros": _pack_cols(z - 1, 4),
                            f"{base}.scales": s, f"{base}.g_idx": g_idx.to(torch.int32)})
    return tensors, expect


def _write_dir(out: Path, cfg: dict, tensors: dict, kind: str | None = None, group: int = 32) -> Path:
    """An HF directory of tensors and cfg (with kind's quantization_config when given)."""
    out.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    if kind == "awq":
        cfg = {**cfg, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": group,
                                              "zero_point": True, "version": "gemm"}}
    elif kind is not None:
        cfg = {**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group,
                                              "desc_act": True, "sym": False}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("kind", ["gptq", "gptq-act-order", "awq"])
def test_hf_quantized_directory_loads_to_its_defined_weights(tiny_dirs, tmp_path, kind):
    from safetensors.torch import load_file

    src = Path(tiny_dirs["qwen2"])
    cfg = json.loads((src / "config.json").read_text())
    plain = load_file(str(next(src.glob("*.safetensors"))))
    tensors, expect = _hf_quantized(plain, kind, 32)
    out = _write_dir(tmp_path / kind, cfg, tensors, kind)
    assert quant_kind(out) == kind.split("-")[0]
    model = load_model(str(out), open_checkpoint(str(out)).arch_config(), torch.device("cpu"), progress=False)
    for i in range(2):
        attn, mlp = model.layers[i].self_attn, model.layers[i].mlp
        p = f"model.layers.{i}."
        want_qkv = torch.cat([expect[p + f"self_attn.{x}_proj"] for x in "qkv"])
        got = attn.qkv_proj.dequantize()
        torch.testing.assert_close(got, want_qkv, rtol=1e-6, atol=1e-6)
        want_b = torch.cat([plain[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        torch.testing.assert_close(attn.qkv_proj(torch.zeros(1, 64))[0], want_b)
        torch.testing.assert_close(mlp.down_proj.dequantize(), expect[p + "mlp.down_proj"], rtol=1e-6,
                                   atol=1e-6)
        torch.testing.assert_close(mlp.gate_up_proj.dequantize(),
                                   torch.cat([expect[p + "mlp.gate_proj"], expect[p + "mlp.up_proj"]]))
    torch.testing.assert_close(model.embed_tokens.weight, plain["model.embed_tokens.weight"])


@pytest.mark.parametrize("kind", ["gptq", "gptq-act-order", "awq"])
def test_phi3_fused_quantized_checkpoint_serves_its_dequantized_weights(tmp_path, kind):
    """Phi-3's GPTQ / AWQ checkpoints pack its fused qkv_proj and gate_up_proj: each fills our fused module
    whole, and greedy decoding equals the same weights dequantized into a plain checkpoint."""
    import shutil

    from safetensors.torch import load_file
    from tiny_models import build_family

    src = build_family(tmp_path / "phi3", "phi3", tie=False)
    plain = load_file(str(src / "model.safetensors"))
    assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(plain)
    cfg = json.loads((src / "config.json").read_text())
    tensors, expect = _hf_quantized(plain, kind, 32)
    quant = _write_dir(tmp_path / kind, cfg, tensors, kind)
    dense = _write_dir(tmp_path / "dequantized", cfg, {**plain, **{f"{b}.weight": w for b, w in expect.items()}})
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):  # the tokenizer's files
            shutil.copy(f, quant)
            shutil.copy(f, dense)
    assert quant_kind(quant) == kind.split("-")[0]
    model = load_model(str(quant), open_checkpoint(str(quant)).arch_config(), torch.device("cpu"), progress=False)
    for i in range(2):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            module = model.layers[i].get_submodule(name)
            assert isinstance(module, QuantLinear)
            torch.testing.assert_close(module.dequantize(), expect[f"model.layers.{i}.{name}"], rtol=1e-6, atol=1e-6)
    ids = [[0, *range(3, 40)], [0, 200, 17, 90, 5]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    # fp32 activations: the int8 ones (the default on VNNI CPUs) round x, which the dense model does not
    got, want = (LLM(str(d), kv_cache_memory_bytes=KV, quant_activations="fp32").generate(ids, params, use_tqdm=False)
                 for d in (quant, dense))
    tokens = [o.outputs[0].token_ids for o in got]
    assert tokens == [o.outputs[0].token_ids for o in want]
    assert all(len(set(t)) > 1 for t in tokens)  # greedy tokens that vary: a model that repeats one proves little
    torch.testing.assert_close(torch.tensor([[lp.logprob for lp in o.outputs[0].logprobs] for o in got]),
                               torch.tensor([[lp.logprob for lp in o.outputs[0].logprobs] for o in want]),
                               rtol=0, atol=1e-3)


def test_a_quantized_module_we_do_not_have_is_refused_by_name(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    src = Path(tiny_dirs["qwen2"])
    tensors, _ = _hf_quantized(load_file(str(next(src.glob("*.safetensors")))), "gptq", 32)
    renamed = {n.replace("layers.1.mlp.down_proj.", "layers.1.mlp.experts.0.w2."): t for n, t in tensors.items()}
    out = _write_dir(tmp_path / "experts", json.loads((src / "config.json").read_text()), renamed, "gptq")
    with pytest.raises(ValueError, match=r"quantized 'model\.layers\.1\.mlp\.experts\.0\.w2' has no place"):
        load_model(str(out), open_checkpoint(str(out)).arch_config(), torch.device("cpu"), progress=False)
