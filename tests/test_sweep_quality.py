"""Quality records for tune/report: measured once per (model, quantization), with the fp32 baseline."""

from tuneserve.bench.points import Point, judge
from tuneserve.bench.records import load_records
from tuneserve.bench.slo import SLO, quality_index
from tuneserve.bench.sweep_quality import ensure_quality


def test_ensure_quality_measures_once_and_feeds_tune(tiny_llama, tmp_path):
    results = tmp_path / "sweep.jsonl"
    rec = ensure_quality(str(tiny_llama), "int4", str(results))
    recs = load_records(results)
    assert [r["config"]["quantization"] for r in recs] == [None, "int4"]
    base = recs[0]["metrics"]
    assert base["kl_divergence"] == 0.0 and base["top1_agreement"] == 1.0
    m = rec["metrics"]
    assert m["kl_divergence"] > 0 and 0 < m["top1_agreement"] <= 1
    assert m["weight_bytes"] < 0.5 * base["weight_bytes"]  # int4: packed nibbles plus fp16 scales and mins
    assert ensure_quality(str(tiny_llama), "int4", str(results))["metrics"] == m
    assert len(load_records(results)) == 2  # nothing measured twice

    quality = quality_index(load_records(results), str(tiny_llama))
    speed = Point({"quantization": "int4"}, 2.0, "serve", 1, runs=[{"requests": [], "output_tok_s": 1.0}])
    ppl = m["perplexity"] / base["perplexity"] - 1
    row = judge(speed, [SLO("ppl_increase", "<=", abs(ppl) + 0.01), SLO("kl", "<=", 2 * m["kl_divergence"])],
                quality)
    assert row.figures["ppl_increase"] == ppl and row.figures["kl"] == m["kl_divergence"] and row.state == "pass"
    assert judge(speed, [SLO("kl", "<=", m["kl_divergence"] / 2)], quality).state == "fail"
