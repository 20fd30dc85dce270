"""prompt_attention: which dtype a prompt chunk's SDPA rounds q, K and V to (kernels/config.py), and where
"auto" chooses bf16 (models/layers.py: after bf16 tiles, in layers without a q|k|v bias)."""

import pytest
import torch
import torch.nn.functional as F

from tuneserve.calibration.calibrate import fresh_context
from tuneserve.engine_args import EngineArgs
from tuneserve.kernels import attention as A
from tuneserve.kernels import quant_ops
from tuneserve.kernels.config import resolve
from tuneserve.loading import load_model, prompt_paths
from tuneserve.models.layers import Attention
from tuneserve.weights import open_checkpoint

HKV, G, D = 2, 3, 16


def _chunk(start: int, n: int, window: int = 0):
    """q, k, v of an n-token chunk at positions start.., its metadata, and a cache holding earlier K/V."""
    g = torch.Generator().manual_seed(start + n)
    q = torch.randn(n, HKV * G, D, generator=g)
    k, v = torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)
    blocks = -(-(start + n) // 4)
    kc, vc = torch.randn(blocks + 1, 4, HKV, D, generator=g), torch.randn(blocks + 1, 4, HKV, D, generator=g)
    meta = A.build_metadata([(start, n, list(range(1, blocks + 1)))], 4, torch.device("cpu"), window=window)
    return q, k, v, kc, vc, meta


@pytest.mark.parametrize("start,window", [(0, 0), (12, 0), (12, 8)])  # fresh, after context, windowed
def test_a_bf16_prompt_chunk_is_sdpa_on_bf16_inputs_and_the_cache_keeps_fp32(start, window):
    q, k, v, kc, vc, meta = _chunk(start, 40, window)
    want = A.paged_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), kc.clone(),
                             vc.clone(), meta, 0.25)  # fp32 SDPA on the rounded values: close, not equal
    kc2, vc2 = kc.clone(), vc.clone()
    got = A.paged_attention(q, k, v, kc2, vc2, meta, 0.25, prompt_dtype=torch.bfloat16)
    fp32 = A.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.25)
    assert got.dtype == torch.float32 and kc2.dtype == torch.float32
    torch.testing.assert_close(kc2.view(-1, HKV, D)[meta.slot_mapping], k, rtol=0, atol=0)  # not rounded
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert 0 < (got - fp32).abs().max() < 3e-2  # bf16 really ran, and stays close to fp32


def test_prompt_dtype_none_is_the_fp32_path_bit_for_bit():
    q, k, v, kc, vc, meta = _chunk(0, 40)
    a = A.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.25)
    b = A.paged_attention(q, k, v, kc.clone(), vc.clone(), meta, 0.25, prompt_dtype=None)
    assert torch.equal(a, b)


def _layers(tiny_dirs, arch, quantization, **choices):
    path = str(tiny_dirs[arch])
    model = load_model(path, open_checkpoint(path).arch_config(), torch.device("cpu"), progress=False,
                       quantization=quantization, kernels=resolve(**choices, env={}))
    return model, [m for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("arch,quantization,choices,bf16_from,path", [
    ("llama", "int4", {}, 48, "bf16(from-48-rows)"),  # int8 below 48 rows, bf16 tiles from there
    ("llama", "int8", {"quant_activations": "bf16"}, 16, "bf16(from-16-rows)"),  # tiles from large_m
    ("llama", "int4", {"quant_activations": "fp32"}, None, "fp32(no-bf16-tiles)"),
    ("llama", "int4", {"quant_activations": "int8-all"}, None, "fp32(no-bf16-tiles)"),
    ("llama", None, {}, None, "fp32(no-bf16-tiles)"),  # fp32 weights: prompts stay fp32 (the HF-equality path)
    ("qwen2", "int4", {}, None, "fp32(qkv-bias)"),
    ("llama", None, {"prompt_attention": "bf16"}, 1, "bf16"),  # asked for by name: every prompt chunk
    ("llama", "int4", {"prompt_attention": "fp32"}, None, "fp32"),
])
def test_auto_takes_bf16_after_bf16_tiles_in_layers_without_a_qkv_bias(tiny_dirs, vnni_bf16_cpu, arch,
                                                                        quantization, choices, bf16_from, path):
    model, layers = _layers(tiny_dirs, arch, quantization, kernels="unfused", **choices)  # no fused plan to build
    assert prompt_paths(model) == path
    for layer in layers:
        assert [r for r in (1, 15, 16, 47, 48, 512) if layer.prompt_bf16(r)] == \
            ([] if bf16_from is None else [r for r in (1, 15, 16, 47, 48, 512) if r >= bf16_from])


def _prompt_logits(model, n):
    ids = torch.arange(3, 3 + n) % 250 + 3
    ctx = fresh_context(model.arch, [n], torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        return model.compute_logits(model(ids, ctx))


@pytest.mark.skipif(not (quant_ops.int8_kernels_available() and quant_ops.native_bf16()),
                    reason="needs the int8 kernels and a native-bf16 CPU (where auto takes bf16)")
def test_auto_on_equals_fp32_off_within_bf16_rounding(tiny_dirs, monkeypatch):
    """The on == off test: the same int4 model, prompt attention auto (bf16 here) and fp32; SDPA really ran in
    bf16 for the 64-token prompt and in fp32 for the 20-token one (below the tiles' 48 rows)."""
    for name in ("TUNESERVE_KERNELS", "TUNESERVE_QUANT_ACT"):
        monkeypatch.delenv(name, raising=False)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: seen.append(q.dtype) or real(q, *a, **kw))
    on, _ = _layers(tiny_dirs, "llama", "int4")
    off, _ = _layers(tiny_dirs, "llama", "int4", prompt_attention="fp32")
    a, seen_on = _prompt_logits(on, 64), set(seen)
    seen.clear()
    b = _prompt_logits(off, 64)
    assert seen_on == {torch.bfloat16} and set(seen) == {torch.float32}
    assert (a - b).abs().max() > 0 and (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    torch.testing.assert_close(a, b, rtol=0, atol=0.1 * float(b.abs().max()))
    seen.clear()
    assert torch.equal(_prompt_logits(on, 20), _prompt_logits(off, 20)) and set(seen) == {torch.float32}


@pytest.mark.parametrize("call", [lambda: resolve(prompt_attention="fp16"),
                                  lambda: EngineArgs(prompt_attention="int8").create_engine_config()])
def test_an_unknown_prompt_attention_names_the_setting_and_the_choices(call):
    with pytest.raises(ValueError, match=r"^prompt_attention must be one of 'auto', 'bf16', 'fp32'"):
        call()


def test_prompt_attention_is_a_cli_flag():
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args(["--prompt-attention", "fp32"])).prompt_attention == "fp32"
