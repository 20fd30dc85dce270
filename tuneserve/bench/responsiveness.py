"""`tuneserve bench health`: does the server stay responsive while it works hard?

Probes /health at a steady rate while the server (1) idles, (2) tokenizes one huge prompt (a completion
whose prompt is `--prompt-mib` MiB of text: tokenized off the event loop, then refused as too long for
the context) and (3) steps a full batch of streaming requests. Reports /health latency per phase, and
the phases' p99 as a ratio to the idle one. The event loop never blocks if the busy p99s stay near idle.
Loopback only (bench/probe.py); start the server with a --max-prompt-chars that admits the big prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

from tuneserve.bench.probe import add_target_args, make_client, served_model
from tuneserve.bench.records import percentile, table


async def probe_health(client: httpx.AsyncClient, stop: asyncio.Event, every: float, min_probes: int) -> list[float]:
    """/health latencies (seconds), one probe every `every` seconds until `stop` is set (and at least
    min_probes of them)."""
    lat: list[float] = []
    while not stop.is_set() or len(lat) < min_probes:
        t0 = time.perf_counter()
        r = await client.get("/health")
        lat.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise RuntimeError(f"/health answered {r.status_code} under load")
        await asyncio.sleep(every)
    return lat


async def during(client: httpx.AsyncClient, work, every: float, min_probes: int = 20):  # noqa: ANN001, ANN201
    """Run `work` (a coroutine) while probing /health; returns (latencies, work's result)."""
    stop = asyncio.Event()
    probes = asyncio.create_task(probe_health(client, stop, every, min_probes))
    try:
        result = await work
    finally:
        stop.set()
    return await probes, result


async def big_prompt(client: httpx.AsyncClient, model: str, mib: float) -> str:
    text = ("lorem ipsum dolor sit amet " * int(mib * (1 << 20) / 27 + 1))[: int(mib * (1 << 20))]
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json={"model": model, "prompt": text, "max_tokens": 1}, timeout=600)
    why = r.json().get("error", {}).get("message", "")[:48] if r.status_code >= 400 else ""
    return f"HTTP {r.status_code} after {time.perf_counter() - t0:.1f} s {why}".rstrip()


async def full_batch(client: httpx.AsyncClient, model: str, batch: int, max_tokens: int) -> str:
    async def one(i: int) -> int:
        body = {"model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body, timeout=600) as r:
            return sum([1 async for line in r.aiter_lines() if line.startswith("data: {")])

    t0 = time.perf_counter()
    chunks = await asyncio.gather(*(one(i) for i in range(batch)))
    return f"{batch} streams, {sum(chunks)} chunks in {time.perf_counter() - t0:.1f} s"


async def run(ns: argparse.Namespace) -> dict:
    async with make_client(ns.base_url, ns.api_key, timeout=600) as client:
        model = ns.model or await served_model(client)
        idle, _ = await during(client, asyncio.sleep(ns.idle_seconds), ns.every)
        tok, tok_note = await during(client, big_prompt(client, model, ns.prompt_mib), ns.every)
        batch, batch_note = await during(client, full_batch(client, model, ns.batch, ns.max_tokens), ns.every)
    phases = {"idle": (idle, ""), f"tokenizing a {ns.prompt_mib:g} MiB prompt": (tok, tok_note),
              f"full batch of {ns.batch}": (batch, batch_note)}
    base = percentile(idle, 99)
    return {name: {"probes": len(lat), "p50_ms": 1e3 * percentile(lat, 50), "p99_ms": 1e3 * percentile(lat, 99),
                   "max_ms": 1e3 * max(lat), "p99_vs_idle": percentile(lat, 99) / base, "work": note}
            for name, (lat, note) in phases.items()}


def main(ns: argparse.Namespace) -> int:
    res = asyncio.run(run(ns))
    rows = [{"phase": name, "probes": r["probes"], "p50 ms": f"{r['p50_ms']:.1f}", "p99 ms": f"{r['p99_ms']:.1f}",
             "max ms": f"{r['max_ms']:.1f}", "p99 / idle": f"{r['p99_vs_idle']:.2f}x", "work": r["work"]}
            for name, r in res.items()]
    print(table(rows, ["phase", "probes", "p50 ms", "p99 ms", "max ms", "p99 / idle", "work"]))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(res, f, indent=2)
    worst = max(r["p99_ms"] for r in res.values())
    return 0 if worst <= ns.p99_limit_ms else 1


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("health", help="/health latency while the server tokenizes a huge prompt and steps a full batch")
    p.add_argument("--prompt-mib", type=float, default=8.0, help="size of the big prompt")
    p.add_argument("--batch", type=int, default=32, help="concurrent streams of the full-batch phase")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per stream in the full-batch phase")
    p.add_argument("--every", type=float, default=0.02, help="seconds between /health probes")
    p.add_argument("--idle-seconds", type=float, default=2.0)
    p.add_argument("--p99-limit-ms", type=float, default=100.0, help="exit 1 if a phase's p99 is above this")
    add_target_args(p, "write the results here")
    p.set_defaults(bench_main=main)
