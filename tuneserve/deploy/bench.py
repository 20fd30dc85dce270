"""`tuneserve bench replicas`: what replica routing buys, on a local Ray Serve cluster.

(a) Shared prefixes: P distinct ~1k-token documents, each asked R questions in shuffled rounds, over 2
    replicas whose KV caches hold about half of the documents each; prefix-aware routing against round
    robin: prefix-cache hit rate (sum of usage.prompt_tokens_details.cached_tokens / sum of prompt_tokens)
    and mean time to first token.
(b) Random prompts (no shared prefixes): 2 replicas of 1 torch thread against 1 replica of 2 threads:
    output tokens per second (what the routing layer and the split cost).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import shlex
import sys
import time

import httpx

from tuneserve.bench.records import table, write_json
from tuneserve.bench.workloads import build_workload
from tuneserve.corpus import load_corpus, sample_prompts
from tuneserve.deploy.config import DeployConfig
from tuneserve.kernels.config import cpu_name
from tuneserve.server.launch import free_port


def _one(url: str, model: str, prompt: str | list[int], max_tokens: int) -> dict:
    """A streamed completion: its TTFT (to the first token's event) and final usage."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, usage, replica = None, None, None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
        replica = r.headers.get("x-tuneserve-replica")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(f"stream error: {ev['error']}")
            if ev.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                usage = ev["usage"]
    return {"ttft": ttft, "e2e": time.perf_counter() - t0, "usage": usage, "replica": replica}


def run_requests(url: str, model: str, prompts: list, max_tokens: int, concurrency: int) -> dict:
    """Send prompts in order, `concurrency` at a time; aggregate hit rate, TTFT and output throughput."""
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(lambda p: _one(url, model, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    prompt = sum(r["usage"]["prompt_tokens"] for r in res)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in res)
    out = sum(r["usage"]["completion_tokens"] for r in res)
    ttfts = [r["ttft"] for r in res if r["ttft"] is not None]
    return {"requests": len(res), "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt if prompt else 0.0, "mean_ttft_s": sum(ttfts) / len(ttfts),
            "output_tokens": out, "wall_s": wall, "output_tok_s": out / wall,
            "per_replica": {r: sum(1 for x in res if x["replica"] == r) for r in sorted({x["replica"] for x in res})}}


def shared_prefix_prompts(tok, ns: argparse.Namespace) -> list[str]:  # noqa: ANN001 - an HF tokenizer
    """Rounds of questions on P documents, the documents in a fresh shuffled order each round."""
    docs = [tok.decode(ids) for ids in sample_prompts(tok, load_corpus("wikipedia"), ns.prefixes,
                                                       ns.prefix_tokens, ns.prefix_tokens, seed=1)]
    rng = random.Random(0)
    prompts = []
    for r in range(ns.rounds):
        order = list(range(ns.prefixes))
        rng.shuffle(order)
        prompts += [f"{docs[i]}\n\nQuestion {r}: what does paragraph {r + 1} of document {i} say?" for i in order]
    return prompts


def _config(ns: argparse.Namespace, **kw) -> DeployConfig:  # noqa: ANN003
    engine = {"max_num_seqs": 16}
    if kw.pop("kv_tokens", None):
        engine["kv_cache_memory_bytes"] = ns.kv_cache_tokens * ns.kv_bytes_per_token
    return DeployConfig(model=ns.model, engine_args=engine, max_ongoing_requests=16, max_queued_requests=256,
                        graceful_shutdown_timeout_s=2, **kw)


def run(ns: argparse.Namespace) -> dict:
    from tuneserve.deploy.local import Deployment
    from tuneserve.engine_args import EngineArgs
    from tuneserve.tokenizer import load_tokenizer

    mc = EngineArgs(model=ns.model).create_engine_config().model
    tok = load_tokenizer(mc.path, mc.tokenizer)
    ns.kv_bytes_per_token = mc.arch.kv_bytes_per_token
    if ns.kv_cache_tokens is None:  # room for half of the documents per replica (what routing by prefix needs),
        # and the requests in flight
        ns.kv_cache_tokens = ns.prefixes // 2 * (ns.prefix_tokens + 64) + ns.concurrency * (ns.max_tokens + 64)
    name = ns.model
    shared = shared_prefix_prompts(tok, ns)
    rand = [list(p) for p in build_workload(tok, "random", ns.random_requests, ns.random_max_tokens).prompts]
    out: dict = {"cpu": cpu_name(), "command": "tuneserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                 "model": name, "kv_cache_tokens_per_replica": ns.kv_cache_tokens}
    port = ns.port or free_port()
    d = None
    try:
        for label, cfg, work in [
            ("prefix", _config(ns, num_replicas=2, torch_threads=1, routing="prefix", kv_tokens=True), "both"),
            ("round_robin", _config(ns, num_replicas=2, torch_threads=1, routing="round_robin", kv_tokens=True),
             "shared"),
            ("1x2threads", _config(ns, num_replicas=1, torch_threads=2, ray_actor_options={"num_cpus": 2}), "random"),
        ]:
            if d is None:
                d = Deployment(cfg, port=port, num_cpus=ns.num_cpus)
            else:
                d.undeploy()
                d.deploy(cfg)
            if work in ("both", "shared"):
                out[f"shared_{label}"] = run_requests(d.url, name, shared, ns.max_tokens, ns.concurrency)
                print(f"[bench] shared prefixes, {label}: {json.dumps(out[f'shared_{label}'])}", file=sys.stderr)
            if work in ("both", "random"):
                key = "random_2x1thread" if label == "prefix" else "random_1x2threads"
                out[key] = run_requests(d.url, name, rand, ns.random_max_tokens, ns.random_concurrency)
                print(f"[bench] random, {key}: {json.dumps(out[key])}", file=sys.stderr)
    finally:
        if d is not None:
            d.close()
    a, b = out["shared_prefix"], out["shared_round_robin"]
    out["hit_rate_ratio"] = a["hit_rate"] / b["hit_rate"] if b["hit_rate"] else float("inf")
    out["ttft_ratio"] = a["mean_ttft_s"] / b["mean_ttft_s"]
    out["throughput_ratio"] = out["random_2x1thread"]["output_tok_s"] / out["random_1x2threads"]["output_tok_s"]
    return out


def report(out: dict) -> str:
    def row(run: str, key: str, hits: bool) -> dict:
        r = out[key]
        return {"run": run, "hit rate": f"{r['hit_rate']:.1%}" if hits else "",
                "mean TTFT s": f"{r['mean_ttft_s']:.2f}", "out tok/s": f"{r['output_tok_s']:.1f}"}

    rows = [row("shared prefixes, prefix-aware", "shared_prefix", True),
            row("shared prefixes, round robin", "shared_round_robin", True),
            row("random, 2 replicas x 1 thread", "random_2x1thread", False),
            row("random, 1 replica x 2 threads", "random_1x2threads", False)]
    return "\n".join([f"cpu: {out['cpu']}", f"command: {out['command']}",
                      table(rows, ["run", "hit rate", "mean TTFT s", "out tok/s"]),
                      f"prefix-aware / round robin: hit rate {out['hit_rate_ratio']:.2f}x, mean TTFT "
                      f"{out['ttft_ratio']:.2f}x; random: 2x1 / 1x2 throughput {out['throughput_ratio']:.2f}x"])


def main(ns: argparse.Namespace) -> int:
    from tuneserve.deploy import RAY_MISSING

    try:
        import ray.serve  # noqa: F401
    except ImportError:
        print(RAY_MISSING, file=sys.stderr)
        return 2
    out = run(ns)
    print(report(out))
    write_json(ns.json, out)
    return 0


def add_parser(bsub) -> None:  # noqa: ANN001 - argparse's subparsers
    p = bsub.add_parser("replicas", help="replicas on Ray Serve: prefix-aware routing vs round robin, "
                        "2 replicas x 1 thread vs 1 x 2 (needs the [ray] extra)")
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--prefixes", type=int, default=8, help="distinct shared documents")
    p.add_argument("--prefix-tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3, help="questions per document")
    p.add_argument("--max-tokens", type=int, default=8, help="output tokens of a shared-prefix request")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache per replica (default: about half the documents and the requests in flight)")
    p.add_argument("--random-requests", type=int, default=16)
    p.add_argument("--random-max-tokens", type=int, default=32)
    p.add_argument("--random-concurrency", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    p.set_defaults(bench_main=main)
