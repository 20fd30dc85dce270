"""`tuneserve report`: an HTML page with plots and tables drawn from a sweep's results file.

Repeated runs of one point (same system, configuration, workload, mode and offered rate) are drawn as one
marker at their mean with error bars (the 95% t-interval over the runs, bench/stats.py; none for a single
run), labelled with the requests behind it (requests per run x runs).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tuneserve.bench.points import config_id, like_key, run_count, runs_label
from tuneserve.bench.records import fmt, load_records
from tuneserve.bench.slo import latency_value
from tuneserve.bench.stats import Interval, t_interval


def _mb(v: Any) -> float | None:
    return None if v is None else v / 1e6


def _ms(v: Any) -> float | None:
    return None if v is None else v * 1e3


def _cfg(r: dict, key: str, default: Any = None) -> Any:
    return r.get("config", {}).get(key, default)


def _is_base(r: dict) -> bool:
    return _cfg(r, "quantization") in (None, "none") and _cfg(r, "speculative", "off") in (None, "off")


def point_groups(records: list[dict], kind: str) -> list[tuple[dict, list[dict]]]:
    """(first record, every run's metrics) of each point: records of one kind with equal system, configuration,
    workload, mode, rate, requests per run and output length."""
    groups: dict[str, tuple[dict, list[dict]]] = {}
    for r in records:
        if r.get("kind") == kind and "metrics" in r:
            key = json.dumps([r.get("system"), config_id(r.get("config", {})), like_key(r)], default=str)
            groups.setdefault(key, (r, []))[1].append(r["metrics"])
    return list(groups.values())


def _iv(runs: list[dict], fn: Any) -> Interval | None:
    return t_interval([v for v in (fn(m) for m in runs) if v is not None])


def _err(iv: Interval | None, scale: float = 1.0) -> float:
    return 0.0 if iv is None or iv.n < 2 else iv.half * scale


def _lat(key: str, metric: str) -> Any:
    """A run's latency in seconds: from its requests, else its summary key."""
    return lambda m: latency_value(m["requests"], metric) if m.get("requests") else m.get(key)


def _cell(runs: list[dict], fn: Any, scale: float = 1.0) -> str:
    iv = _iv(runs, fn)
    return "-" if iv is None else str(Interval(iv.mean * scale, iv.lo * scale, iv.hi * scale, iv.n))


def serve_rows(records: list[dict]) -> list[dict]:
    """Serve points (offered rate, Poisson arrivals): figures as mean ±half-width over the runs."""
    rows = []
    for first, runs in point_groups(records, "serve"):
        rows.append({"system": first.get("system", "tuneserve"), "workload": first.get("workload"),
                     "config": config_id(first.get("config", {})), "rate": first.get("rate"),
                     "requests": runs_label(run_count(first), runs),
                     "output_tok_s": _cell(runs, lambda m: m.get("output_tok_s")),
                     "ttft_p99_ms": _cell(runs, _lat("ttft_p99_s", "ttft_p99"), 1e3),
                     "tpot_p99_ms": _cell(runs, _lat("tpot_p99_s", "tpot_p99"), 1e3)})
    return sorted(rows, key=lambda r: (r["system"], str(r["workload"]), r["config"], float(r["rate"] or 0)))


def latency_rows(records: list[dict]) -> list[dict]:
    """Table 1: latency vs throughput by batch size (unquantized, no speculation): each point's figures as
    mean ±half-width over its runs."""
    rows = []
    groups = sorted(point_groups(records, "offline"), key=lambda g: (g[0]["system"], _cfg(g[0], "max_num_seqs", 0)))
    for first, runs in groups:
        if first["system"] == "tuneserve" and not _is_base(first):
            continue
        rows.append({"system": first["system"], "batch": _cfg(first, "max_num_seqs"),
                     "requests": runs_label(run_count(first), runs), "threads": runs[0].get("threads"),
                     "tok_s": _cell(runs, lambda m: m.get("output_tok_s")),
                     "ms_per_token_p50": _cell(runs, lambda m: m.get("tpot_p50_s"), 1e3),
                     "ms_per_token_p99": _cell(runs, lambda m: m.get("tpot_p99_s"), 1e3),
                     "ttft_p50_ms": _cell(runs, lambda m: m.get("ttft_p50_s"), 1e3)})
    return rows


def precision_rows(records: list[dict]) -> list[dict]:
    """Table 2: precision vs quality vs memory vs speed (speeds: mean ±half-width over runs)."""
    quality = {str(_cfg(r, "quantization")): r["metrics"] for r in records if r.get("kind") == "quality"}
    speed: dict[str, dict] = {}
    mem: dict[str, float] = {}
    for first, runs in point_groups(records, "offline"):
        if first["system"] == "tuneserve" and _cfg(first, "speculative", "off") in (None, "off"):
            q = str(_cfg(first, "quantization"))
            speed.setdefault(q, {})[_cfg(first, "max_num_seqs")] = _cell(runs, lambda m: m.get("output_tok_s"))
            if runs[0].get("weight_bytes"):
                mem[q] = runs[0]["weight_bytes"]
    rows = []
    for q in sorted(set(quality) | set(speed), key=lambda s: (s != "None", s)):
        qm = quality.get(q, {})
        sp = speed.get(q, {})
        rows.append({"quantization": "none" if q == "None" else q, "perplexity": qm.get("perplexity"),
                     "kl_divergence": qm.get("kl_divergence"), "top1_agreement": qm.get("top1_agreement"),
                     "weight_MB": _mb(qm.get("weight_bytes") or mem.get(q)),
                     "tok_s_batch1": sp.get(1), "largest_batch": max(sp, default=None),
                     "tok_s_largest_batch": sp.get(max(sp, default=None))})
    return rows


def context_rows(records: list[dict]) -> list[dict]:
    """Table 3: context length vs cost."""
    rows = []
    for r in records:
        if r.get("kind") == "context":
            m = r["metrics"]
            rows.append({"model": r.get("model"), "attention": r.get("config", {}).get("attention", "full"),
                         "context": m.get("context"), "prefill_s": m.get("prefill_s"),
                         "decode_ms_per_token": _ms(m.get("decode_s_per_token")), "kv_MB": _mb(m.get("kv_bytes"))})
    return sorted(rows, key=lambda r: (r["model"] or "", r["attention"], r["context"] or 0))


def spec_rows(records: list[dict]) -> list[dict]:
    """Speculation on vs off by batch size."""
    by: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") == "offline" and r["system"] == "tuneserve" and _cfg(r, "quantization") in (None, "none"):
            key = (r.get("workload"), _cfg(r, "max_num_seqs"))
            by.setdefault(key, {})[_cfg(r, "speculative", "off") or "off"] = r["metrics"]
    rows = []
    for (wl, b), d in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        for mode, m in d.items():
            if mode == "off" or "off" not in d:
                continue
            rows.append({"workload": wl, "batch": b, "speculative": mode, "off_tok_s": d["off"].get("output_tok_s"),
                         "on_tok_s": m.get("output_tok_s"),
                         "ratio": (m.get("output_tok_s") / d["off"]["output_tok_s"]
                                   if d["off"].get("output_tok_s") else None),
                         "acceptance": m.get("spec_acceptance_rate")})
    return rows


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by any other (higher throughput x, lower latency y), sorted by x."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def _plots(records: list[dict], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    groups = [(f, runs) for f, runs in point_groups(records, "offline") if f["metrics"].get("tpot_p50_s") is not None]
    _pareto_plot(plt, groups, out / "latency_throughput.png", "tpot_p50_s", "ms per output token (p50)",
                 lambda f, runs: f"{_cfg(f, 'max_num_seqs', '')} n={runs_label(run_count(f), runs)}",
                 "latency vs throughput (offline batches)")
    made.append(("latency_throughput.png", "Latency vs throughput, offline (labels: max_num_seqs, requests x runs; "
                 "error bars: 95% t-interval over runs)"))
    serve = point_groups(records, "serve")
    _pareto_plot(plt, serve, out / "serve_pareto.png", "tpot_p99_s", "ms per output token (p99)",
                 lambda f, runs: f"{fmt(f.get('rate'))}/s n={runs_label(run_count(f), runs)}",
                 "served at an offered rate (Poisson)", metric="tpot_p99")
    made.append(("serve_pareto.png", "Serve mode: p99 TPOT vs throughput at each offered rate (labels: req/s, "
                 "requests x runs; error bars: 95% t-interval over runs)"))

    prec = [r for r in precision_rows(records) if r["perplexity"] is not None and r["weight_MB"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in prec:
        ax.scatter([r["weight_MB"]], [r["perplexity"]])
        ax.annotate(r["quantization"], (r["weight_MB"], r["perplexity"]), fontsize=8)
    ax.set(xlabel="weight MB", ylabel="perplexity", title="quality vs memory")
    fig.tight_layout()
    fig.savefig(out / "quality_memory.png", dpi=110)
    plt.close(fig)
    made.append(("quality_memory.png", "Quality vs memory"))

    ctx = context_rows(records)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["attention"]) for r in ctx}):
        pts = [r for r in ctx if (r["model"], r["attention"]) == key and r["prefill_s"] is not None]
        ax.plot([r["context"] for r in pts], [r["prefill_s"] for r in pts], marker="o", label=f"{key[0]} {key[1]}")
    ax.set(xlabel="context tokens", ylabel="prefill seconds", title="cost vs context")
    if ctx:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "context_cost.png", dpi=110)
    plt.close(fig)
    made.append(("context_cost.png", "Cost vs context length"))
    return made


def _pareto_plot(plt: Any, groups: list[tuple[dict, list[dict]]], path: Path, key: str, ylabel: str, label: Any,
                 title: str, metric: str | None = None) -> None:
    """Throughput vs latency, one marker per point at the mean of its runs, error bars, Pareto frontier."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours, colors = [], {}  # one colour per configuration family (all but max_num_seqs), fixed for the legend
    for first, runs in groups:
        xi = _iv(runs, lambda m: m.get("output_tok_s"))
        yi = _iv(runs, _lat(key, metric) if metric else (lambda m: m.get(key)))
        if xi is None or yi is None:
            continue
        x, y = xi.mean, yi.mean * 1e3
        sysname = first.get("system", "tuneserve")
        rest = {k: v for k, v in first["config"].items() if k != "max_num_seqs"}
        fam = sysname if sysname != "tuneserve" or not rest else json.dumps(rest, default=str)
        color = colors.setdefault(fam, f"C{len(colors) % 10}")
        ax.errorbar([x], [y], xerr=[_err(xi)], yerr=[_err(yi, 1e3)], fmt="o" if sysname == "tuneserve" else "s",
                    ms=5, capsize=2, lw=0.8, label=fam, color=color)
        ax.annotate(label(first, runs), (x, y), fontsize=6)
        if sysname == "tuneserve":
            ours.append((x, y))
    front = pareto(ours)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=1, label="Pareto frontier")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=6)
    ax.set(xlabel="output tokens/s", ylabel=ylabel, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html_table(rows: list[dict], title: str) -> str:
    if not rows:
        return f"<h2>{html.escape(title)}</h2><p class='empty'>no measurements yet</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CHECK = """<pre id="image-check"></pre><script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  document.getElementById('image-check').textContent =
    JSON.stringify(imgs.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight})));
});
</script>"""


def render_report(records: list[dict], out_dir: str | Path, title: str = "tuneserve trade-off report") -> Path:
    """Write DIR/index.html with the plots (PNG) and the tables; returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(records, out)
    figs = "".join(f"<figure><img src='{src}' alt='{html.escape(cap)}'><figcaption>{html.escape(cap)}"
                   f"</figcaption></figure>" for src, cap in plots)
    tables = (_html_table(latency_rows(records), "1. Latency vs throughput by batch size")
              + _html_table(serve_rows(records), "Served at an offered rate (mean ±half-width of a 95% "
                            "t-interval over runs; requests: per run x runs)")
              + _html_table(precision_rows(records), "2. Precision vs quality vs memory vs speed")
              + _html_table(context_rows(records), "3. Context length vs cost")
              + _html_table(spec_rows(records), "Speculation on vs off"))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:1em}"
            "table{border-collapse:collapse;margin-bottom:1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
            "text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{len(records)} measurements</p>{figs}{tables}{_CHECK}</body></html>")
    path = out / "index.html"
    path.write_text(page)
    return path


def main(ns: Any) -> int:
    path = render_report(load_records(ns.results), ns.out)
    print(f"[tuneserve] report written to {path}")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="an HTML page with plots and tables from a sweep's results")
    p.add_argument("results", help="results JSONL from `tuneserve sweep`")
    p.add_argument("--out", default="results/report")
    p.set_defaults(func=main)
