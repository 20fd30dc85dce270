"""Quality measurement: perplexity, KL divergence and top-1 agreement over fixed windows."""

import math

import torch

from tuneserve.bench.quality import evaluate, format_table, scored_rows
from tuneserve.loading import load_model, quantize_with_recipe
from tuneserve.quant.recipe import QuantRecipe
from tuneserve.weights import open_checkpoint


def _model(path):
    arch = open_checkpoint(str(path)).arch_config()
    return load_model(str(path), arch, torch.device("cpu"), progress=False)


def test_scored_rows_score_every_token_once():
    from tuneserve.corpus import eval_windows

    for n, window, stride in [(100, 32, 32), (100, 32, 16), (37, 64, 64), (64, 32, 8)]:
        wins = eval_windows(list(range(n)), window, stride)
        scored = []
        for s, e, first in scored_rows(wins):
            scored += [s + r + 1 for r in range(first, e - s - 1)]  # row r predicts token s + r + 1
        # every token once, except a window's first token when no earlier window reaches it (no context)
        unreachable = {s for i, (s, _) in enumerate(wins) if i and wins[i - 1][1] <= s}
        assert scored == [t for t in range(1, n) if t not in unreachable]


def test_perplexity_is_exp_mean_nll_and_self_kl_is_zero(tiny_dirs):
    model = _model(tiny_dirs["llama"])
    ids = [(7 * i * i + 3 * i) % 250 + 3 for i in range(70)]
    r = evaluate({"a": (model, 0), "b": (model, 0)}, ids, window=32, stride=32, progress=False)
    assert r[0]["kl_divergence"] == 0 and r[1]["top1_agreement"] == 1 and r[1]["kl_divergence"] < 1e-6
    # the same from plain forwards of each window: windows (0, 32), (32, 64), (38, 70) score tokens
    # 1-31 (rows 0-30), 33-63 (rows 0-30) and 64-69 (rows 25-30); token 32 starts a window without context
    from tuneserve.calibration.calibrate import fresh_context

    nll, n = 0.0, 0
    for s, e, rows in [(0, 32, range(0, 31)), (32, 64, range(0, 31)), (38, 70, range(25, 31))]:
        ctx = fresh_context(model.arch, [e - s], torch.device("cpu"), torch.float32)
        with torch.inference_mode():
            lp = torch.log_softmax(model.compute_logits(model(torch.tensor(ids[s:e]), ctx)), -1)
        for row in rows:
            nll -= float(lp[row, ids[s + row + 1]])
            n += 1
    assert r[0]["tokens_scored"] == n == len(ids) - 2
    assert math.isclose(r[0]["perplexity"], math.exp(nll / n), rel_tol=1e-5)
    assert "perplexity" in format_table(r)


def test_quantized_model_diverges_measurably_and_int8_less_than_int4(tiny_dirs):
    ids = [(11 * i * i + 5 * i) % 250 + 3 for i in range(96)]
    base = _model(tiny_dirs["qwen2"])
    models = {"fp32": (base, 0)}
    for bits in (8, 4):
        m = _model(tiny_dirs["qwen2"])
        quantize_with_recipe(m, QuantRecipe(bits=bits, group_size=32), progress=False)
        models[f"int{bits}"] = (m, 0)
    r = {x["name"]: x for x in evaluate(models, ids, window=48, stride=48, progress=False)}
    assert 0 < r["int8"]["kl_divergence"] < r["int4"]["kl_divergence"]
    assert r["int8"]["top1_agreement"] >= r["int4"]["top1_agreement"]
    assert r["int4"]["weight_bytes"] < r["int8"]["weight_bytes"] < r["fp32"]["weight_bytes"]


def test_sliding_window_eval_matches_full_attention_when_the_window_covers_the_text(tiny_dirs):
    model = _model(tiny_dirs["llama"])
    ids = [(5 * i + 1) % 250 + 3 for i in range(60)]
    r = evaluate({"full": (model, 0), "sw64": (model, 64), "sw8": (model, 8)}, ids, window=60, stride=60,
                 progress=False)
    assert math.isclose(r[1]["perplexity"], r[0]["perplexity"], rel_tol=1e-5) and r[1]["kl_divergence"] < 1e-8
    assert r[2]["kl_divergence"] > 1e-4  # an 8-token window (plus 4 sinks) sees less context
