"""GPTQ and AWQ against round-to-nearest on a real SmolLM2 layer with real activations, and quantized greedy
generation against the unquantized model through the engine."""

import pytest
import torch

from tuneserve.calibration.awq import awq_quantize
from tuneserve.calibration.calibrate import InputStats, calibration_windows, fresh_context
from tuneserve.calibration.gptq import gptq_quantize, output_error
from tuneserve.quant.rtn import fake_quant


@pytest.fixture(scope="module")
def smollm2():
    from tuneserve.loading import load_model
    from tuneserve.tokenizer import load_tokenizer
    from tuneserve.weights import open_checkpoint
    from tuneserve.weights.sources import alias_path

    path = alias_path("smollm2-135m")
    if not path.exists():
        pytest.skip("smollm2-135m is not in the cache (tuneserve pull smollm2-135m)")
    arch = open_checkpoint(str(path)).arch_config()
    model = load_model(str(path), arch, torch.device("cpu"), progress=False)
    return str(path), model, load_tokenizer(str(path))


def _layer_stats(model, windows, names):
    """Input statistics of the named linears over the windows (the model unchanged)."""
    mods = dict(model.named_modules())
    stats = {n: InputStats(mods[n].weight.shape[1]) for n in names}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: stats[n].add(a[0])) for n in names]
    try:
        with torch.inference_mode():
            for w in windows:
                ctx = fresh_context(model.arch, [len(w)], torch.device("cpu"), torch.float32)
                model(torch.tensor(w), ctx)
    finally:
        for h in hooks:
            h.remove()
    return stats


def test_gptq_and_awq_beat_rtn_on_real_layers_on_held_out_text(smollm2):
    _, model, tok = smollm2
    names = ["layers.5.self_attn.qkv_proj", "layers.20.mlp.down_proj"]  # attention and MLP, early and late
    # 32 x 256 calibration tokens: with 8 x 256 (fewer tokens than down_proj has inputs, 1536) GPTQ overfits
    # the calibration Hessian and loses to RTN on held-out text (measured 0.0069 vs 0.0056).
    windows = calibration_windows(tok, "python-docs", 36, 256, seed=0)  # always present, no download
    calib = _layer_stats(model, windows[:32], names)
    held_out = _layer_stats(model, windows[32:], names)  # judged on text neither method saw
    mods = dict(model.named_modules())
    for name in names:
        w, h = mods[name].weight.detach().float(), calib[name].hessian
        h_eval = held_out[name].hessian
        rtn = output_error(w, fake_quant(w, 4, 64), h_eval)
        gptq = output_error(w, gptq_quantize(w, h, 4, 64)["w_hat"], h_eval)
        awq = output_error(w, awq_quantize(w, h, calib[name].abs_mean, 4, 64)["w_hat"], h_eval)
        assert gptq < 0.9 * rtn, (name, gptq, rtn)
        assert awq < 0.95 * rtn, (name, awq, rtn)
        g8 = output_error(w, gptq_quantize(w, h, 8, None)["w_hat"], h_eval)
        assert g8 < output_error(w, fake_quant(w, 8, w.shape[1]), h_eval), name


PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1969, the first humans",
           "The three primary colors are", "Water boils at", "Photosynthesis is the process",
           "import numpy as np\n", "Once upon a time, a small robot"]


def _greedy(llm, n=32):
    from tuneserve import SamplingParams

    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _agreement(a, b):
    """Mean fraction of positions with the same token, and mean length of the common prefix."""
    pos = sum(sum(x == y for x, y in zip(s, t)) / len(s) for s, t in zip(a, b)) / len(a)
    prefix = []
    for s, t in zip(a, b):
        k = 0
        while k < len(s) and s[k] == t[k]:
            k += 1
        prefix.append(k)
    return pos, sum(prefix) / len(prefix)


# Floors set from measurements on this machine (8 prompts x 32 greedy tokens; mean fraction of equal
# positions, mean tokens before the first difference): gguf with fp32 activations 1.0 / 32 (the same
# weights), gguf 0.63 / 19.3 and int8 0.55 / 15.8 with the int8-activation decode kernels, int4 RTN
# 0.06 / 1.4 (a 135M model at 4 bits drifts within a few tokens; its teacher-forced agreement is checked
# below). The floors sit well under those numbers and far above what a broken kernel produces.
FLOORS = {"gguf-fp32act": (0.95, 30.0), "gguf": (0.35, 10.0), "int8": (0.3, 8.0), "int4": (0.02, 0.5)}


@pytest.fixture(scope="module")
def fp32_greedy(smollm2):
    from tuneserve import LLM

    return _greedy(LLM(smollm2[0], kv_cache_memory_bytes=64 << 20, quantization="none"))


@pytest.mark.parametrize("case", list(FLOORS))
def test_quantized_greedy_generation_stays_close(smollm2, fp32_greedy, case):
    from tuneserve import LLM

    path, ref = smollm2[0], fp32_greedy
    got = _greedy(LLM(path, quantization=case.split("-")[0], kv_cache_memory_bytes=64 << 20,
                      quant_activations="fp32" if case.endswith("fp32act") else "auto"))
    pos, prefix = _agreement(ref, got)
    floor_pos, floor_prefix = FLOORS[case]
    assert pos >= floor_pos and prefix >= floor_prefix, (case, pos, prefix)


# Teacher-forced on 2048 tokens of the Python docs, measured: int8 top-1 TOP1_INT8, int4 TOP1_INT4.
def test_teacher_forced_agreement_floors(smollm2):
    from tuneserve.bench.quality import evaluate
    from tuneserve.calibration.calibrate import corpus_tokens
    from tuneserve.loading import load_model, quantize_model

    path, base, tok = smollm2
    models = {"fp32": (base, 0)}
    for q in ("int8", "int4"):
        m = load_model(path, base.arch, torch.device("cpu"), progress=False)
        quantize_model(m, q, checkpoint_path=path, progress=False)
        models[q] = (m, 0)
    r = {x["name"]: x for x in evaluate(models, corpus_tokens(tok, "python-docs", 2048), 512, 512, progress=False)}
    print({k: (v["top1_agreement"], v["kl_divergence"], v["perplexity"]) for k, v in r.items()})
    assert r["int8"]["top1_agreement"] >= 0.9 and r["int8"]["kl_divergence"] < 0.03
    assert r["int4"]["top1_agreement"] >= 0.5 and r["int4"]["kl_divergence"] < 1.0
    assert r["int8"]["perplexity"] < 1.02 * r["fp32"]["perplexity"] < r["int4"]["perplexity"]
