"""GGUF-native weights: every block format decodes to what the `gguf` package's dequantize gives, and a
model served from its own blocks computes what the dequantized fp32 model computes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

from tuneserve.kernels import quant_ops as Q
from tuneserve.quant.gguf_native import decode

# where the fp16 scale fields sit in each block, so random blocks get finite, modest scales
D_OFFSETS = {"Q4_1": (0, 2), "Q8_0": (0,), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (208,)}


def random_blocks(kind: str, rows: int, blocks: int, seed: int = 0) -> np.ndarray:
    block_len, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, blocks, type_size), dtype=np.uint8)
    for off in D_OFFSETS[kind]:
        d = (rng.uniform(0.001, 0.05, size=(rows, blocks)) * rng.choice([-1, 1], size=(rows, blocks)))
        data[:, :, off:off + 2] = d.astype(np.float16).view(np.uint8).reshape(rows, blocks, 2)
    return data.reshape(rows, blocks * type_size)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_blocks_decode_like_the_gguf_package(kind):
    blocks = 3 if kind.endswith("K") else 9
    data = random_blocks(kind, 5, blocks)
    ref = dequantize(data, GGMLQuantizationType[kind]).reshape(5, -1)
    d = decode(data, kind)
    qh = torch.from_numpy(d["qhigh"]) if d.get("qhigh") is not None else None
    assert d["bits"] == (5 if kind.startswith("Q5") else 8 if kind in ("Q8_0", "Q6_K") else 4)
    w = Q.dequant_portable(torch.from_numpy(np.ascontiguousarray(d["q"])), torch.from_numpy(d["scales"]),
                           torch.from_numpy(d["mins"]) if d["mins"] is not None else None, qhigh=qh).numpy()
    if kind in ("Q4_1", "Q8_0", "Q5_0", "Q5_1"):  # same codes, same fp16 scales (Q5_0's min -16 d too): exact
        np.testing.assert_array_equal(w, ref)
    else:  # the sub-block scale products d * sc are stored as fp16
        np.testing.assert_allclose(w, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    if Q.compiled_available():  # and the kernels read them as the portable path does
        x = torch.randn(3, w.shape[1])
        qw = torch.from_numpy(np.ascontiguousarray(d["q"]))
        s, m = torch.from_numpy(d["scales"]), torch.from_numpy(d["mins"]) if d["mins"] is not None else None
        act_int8 = Q.uses_act_int8(3, qw, s, m)  # the VNNI kernels round x to int8 per 32 inputs
        ref_y = Q.matmul(x, qw, s, m, path="portable", act_int8=act_int8, qhigh=qh)
        torch.testing.assert_close(Q.matmul(x, qw, s, m, qhigh=qh), ref_y, rtol=1e-4, atol=1e-3)


def _smollm2_path():
    from tuneserve.weights.sources import alias_path

    p = alias_path("smollm2-135m")
    if not p.exists():
        pytest.skip("smollm2-135m is not in the cache (tuneserve pull smollm2-135m)")
    return str(p)


def test_smollm2_native_blocks_match_the_dequantized_model():
    from tuneserve.calibration.calibrate import fresh_context
    from tuneserve.kernels.config import resolve
    from tuneserve.loading import load_model, quantize_model
    from tuneserve.quant.linear import QuantEmbedding, QuantLinear, model_weight_bytes
    from tuneserve.weights import open_checkpoint

    fp32 = resolve(quant_activations="fp32")  # exact weights: keep activations in fp32 too
    path = _smollm2_path()
    arch = open_checkpoint(path).arch_config()
    ref = load_model(path, arch, torch.device("cpu"), progress=False, kernels=fp32)
    model = load_model(path, arch, torch.device("cpu"), progress=False, kernels=fp32)
    report = quantize_model(model, "gguf", checkpoint_path=path, progress=False, kernels=fp32)
    assert report["fallback"] == [] and report["types"] == {"Q8_0": 1, "Q4_1": 210}
    assert isinstance(model.embed_tokens, QuantEmbedding) and model.embed_tokens.bits == 8
    assert isinstance(model.layers[3].mlp.down_proj, QuantLinear) and model.layers[3].mlp.down_proj.bits == 4
    assert model_weight_bytes(model) < 100e6  # the file's size (98 MB), not fp32's 538 MB
    ids = torch.tensor([504, 3575, 282, 4649, 314, 260, 1345, 30, 198, 42, 9])
    outs = []
    for m in (ref, model):
        h = m(ids, fresh_context(arch, [ids.numel()], torch.device("cpu"), torch.float32))
        outs.append(m.compute_logits(h))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-3, atol=2e-3)  # same weights, other order of sums


def test_auto_serves_a_gguf_file_from_its_own_blocks(tiny_llama):
    from tuneserve.engine_args import EngineArgs

    path = _smollm2_path()
    assert EngineArgs(model=path).create_engine_config().model.quantization == "gguf"  # the default
    assert EngineArgs(model=path, quantization="none").create_engine_config().model.quantization is None
    assert EngineArgs(model=path, quantization="int8").create_engine_config().model.quantization == "int8"
    assert EngineArgs(model=str(tiny_llama)).create_engine_config().model.quantization is None  # HF: its dtype


def _weights_of(d):
    t = torch.from_numpy
    return Q.dequant_portable(t(np.ascontiguousarray(d["q"])), t(d["scales"]), t(d["mins"]) if d["mins"] is not None
                              else None, qhigh=t(d["qhigh"]) if d.get("qhigh") is not None else None)


def test_q5_0_parts_join_an_int8_part_as_int8():
    """Qwen2.5's q|k|v: Q5_0 q and k with a Q8_0 v in half the layers. The Q5_0 rows go to int8 (same weights), so
    the projection stays one matrix; Q5_1 (a real min) cannot, and stays a concatenation."""
    from tuneserve.quant.gguf_native import _to_module
    from tuneserve.quant.linear import ConcatLinear, QuantLinear

    q5, q8 = decode(random_blocks("Q5_0", 6, 4), "Q5_0"), decode(random_blocks("Q8_0", 2, 4, seed=1), "Q8_0")
    like = torch.nn.Linear(128, 8, bias=False)
    mixed = _to_module([q5, q8], like)
    assert isinstance(mixed, QuantLinear) and mixed.bits == 8
    assert torch.equal(mixed.dequantize(), torch.cat([_weights_of(q5), _weights_of(q8)]))
    assert _to_module([q5, q5], like).bits == 5
    assert isinstance(_to_module([decode(random_blocks("Q5_1", 6, 4), "Q5_1"), q8], like), ConcatLinear)
