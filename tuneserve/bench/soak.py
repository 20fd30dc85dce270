"""`tuneserve bench soak`: many concurrent clients that misbehave, then proof that nothing leaked or broke.

For --duration seconds, --concurrency clients send a seeded mix of requests (soak_workload.py) to
/v1/completions and /v1/chat/completions: streams read to the end, streams dropped after a few chunks,
requests cancelled before their first chunk, non-streamed requests (some given up on), n > 1, shared
prefixes, greedy and sampled. Then it waits for the server to go idle and checks:

- no request failed (a 4xx/5xx, an error event in a stream, a transport error that was not our own
  hang-up, an answer without a finish_reason, or no answer within --request-timeout: a hang);
- /metrics: no KV block or block reference held, no live, running or waiting request, no more asyncio
  tasks than at idle before the soak, no engine error, RSS growth under --max-rss-growth-mb;
- every completed greedy request's text equals the same body sent alone afterwards (non-streamed), for
  every distinct greedy body or a seeded sample of --verify-max of them.

Only loopback base URLs are accepted (probe.py). Exits 1 when a check fails, naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx

from tuneserve.bench import probe
from tuneserve.bench.exchange import Exchange, send
from tuneserve.bench.records import table, write_json
from tuneserve.bench.soak_workload import CHAT, COMPLETIONS, MODES, Job, Workload

KINDS = ("completed", "disconnected", "aborted", "failed")
SERVER_COUNTERS = {"generation_tokens_total": "gen_tokens", "prefix_cache_queries_total": "prefix_queries",
                   "prefix_cache_hits_total": "prefix_hits", "num_preemptions_total": "preemptions",
                   "spec_decode_num_draft_tokens_total": "draft_tokens",
                   "spec_decode_num_accepted_tokens_total": "accepted_drafts"}  # counter -> report name


@dataclass
class SoakConfig:
    base_url: str
    duration: float = 60.0
    concurrency: int = 8
    seed: int = 0
    max_requests: int = 100_000
    max_tokens: int = 32
    max_n: int = 3
    request_timeout: float = 120.0
    idle_timeout: float = 60.0
    verify_max: int = 64
    max_rss_growth_mb: float | None = 256.0
    api_key: str | None = None
    model: str | None = None
    corpus: str | None = None
    progress: bool = True


@dataclass
class Outcome:
    """A job and what came of it: one of KINDS, with the reason for a failure."""

    job: Job
    ex: Exchange
    kind: str
    reason: str = ""

    def to_json(self) -> dict:
        return {"path": self.job.path, "mode": self.job.mode, "body": self.job.body, "kind": self.kind,
                "reason": self.reason, "status": self.ex.status, "chunks": len(self.ex.chunk_s),
                "latency_s": self.ex.latency}


def classify(job: Job, ex: Exchange, cancelled: bool) -> tuple[str, str]:
    """(kind, reason) of a finished or cancelled job; any error the server or transport caused is a failure."""
    if ex.error is not None:
        return "failed", ex.error
    if cancelled or (job.mode == "abort" and ex.closed_early):
        return "aborted", ""
    if ex.closed_early:
        return "disconnected", ""
    if ex.complete(job.num_choices):
        return "completed", ""
    return "failed", f"incomplete answer: finish reasons {ex.finish} for {job.num_choices} choices"


async def run_job(client: httpx.AsyncClient, job: Job, timeout: float) -> Outcome:
    """Send one job, cancelling it at its abort time, or failing it as hung after timeout seconds."""
    ex = Exchange()
    limit = job.abort_after_s if job.abort_after_s is not None else timeout
    try:
        await asyncio.wait_for(send(client, job.path, job.body, job.stop_after, ex), limit)
    except TimeoutError:
        if job.abort_after_s is None:
            return Outcome(job, ex, "failed", f"hung: no complete answer within {timeout:g} s "
                                              f"(status {ex.status}, {len(ex.chunk_s)} chunks)")
        return Outcome(job, ex, *classify(job, ex, cancelled=True))
    return Outcome(job, ex, *classify(job, ex, cancelled=False))


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    c = Counter(o.kind for o in outcomes)
    return {"sent": len(outcomes), **{k: c.get(k, 0) for k in KINDS}}


async def _progress(cfg: SoakConfig, outcomes: list[Outcome], budget: list[int], t0: float) -> None:
    while True:
        await asyncio.sleep(10)
        done = ", ".join(f"{k} {v}" for k, v in counts(outcomes).items() if k != "sent")
        print(f"soak: {time.monotonic() - t0:.0f}/{cfg.duration:g} s, {cfg.max_requests - budget[0]} requests "
              f"started; {done}", file=sys.stderr, flush=True)


async def load(cfg: SoakConfig, workload: Workload) -> tuple[list[Outcome], float]:
    """Run the clients until the deadline or the request budget; returns the outcomes and the seconds taken."""
    outcomes: list[Outcome] = []
    budget = [cfg.max_requests]
    t0 = time.monotonic()
    deadline = t0 + cfg.duration

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        rng = random.Random(cfg.seed * 1_000_003 + i + 1)  # each client's job sequence is reproducible
        first = True
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            # each client opens with a greedy job of its own mode: even a short soak covers every mode
            job = workload.draw(rng, MODES[i % len(MODES)], greedy=True) if first else workload.draw(rng)
            first = False
            outcomes.append(await run_job(client, job, cfg.request_timeout))

    async with probe.make_client(cfg.base_url, cfg.api_key, cfg.request_timeout, max_connections=None) as client:
        ticker = asyncio.create_task(_progress(cfg, outcomes, budget, t0)) if cfg.progress else None
        try:
            await asyncio.gather(*(client_loop(client, i) for i in range(cfg.concurrency)))
        finally:
            if ticker is not None:
                ticker.cancel()
    return outcomes, time.monotonic() - t0


# ----- greedy outputs against the same request alone ---------------------------------------------------
def solo_body(body: dict) -> dict:
    """The body sent alone for the comparison: the same request, not streamed."""
    return {k: v for k, v in body.items() if k not in ("stream", "stream_options")}


def first_difference(a: str | None, b: str | None) -> int:
    a, b = a or "", b or ""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(job: Job, seen: dict[int, str], solo: dict[int, str]) -> list[dict]:
    """One mismatch record per choice whose soak text differs from the solo text."""
    out = []
    for i in range(job.num_choices):
        if seen.get(i) != solo.get(i):
            out.append({"path": job.path, "body": solo_body(job.body), "choice": i, "soak_text": seen.get(i),
                        "solo_text": solo.get(i), "first_difference_at": first_difference(seen.get(i), solo.get(i))})
    return out


async def verify_greedy(client: httpx.AsyncClient, outcomes: list[Outcome], max_bodies: int, seed: int,
                        timeout: float) -> dict:
    """Resend distinct completed greedy bodies one at a time; every soak answer must equal the solo one."""
    groups: dict[str, tuple[Job, list[dict[int, str]]]] = {}
    for o in outcomes:
        if o.kind == "completed" and o.job.greedy:
            key = json.dumps([o.job.path, solo_body(o.job.body)], sort_keys=True)
            groups.setdefault(key, (o.job, []))[1].append(o.ex.texts)
    keys = sorted(groups)
    if len(keys) > max_bodies:
        keys = sorted(random.Random(seed).sample(keys, max_bodies))
    mismatches: list[dict] = []
    for key in keys:
        job, seen = groups[key]
        solo = Exchange()
        try:
            await asyncio.wait_for(send(client, job.path, solo_body(job.body), ex=solo), timeout)
        except TimeoutError:
            solo.error = f"hung: no answer within {timeout:g} s"
        if not solo.complete(job.num_choices):
            mismatches.append({"path": job.path, "body": solo_body(job.body),
                               "solo_error": solo.error or f"incomplete: {solo.finish}"})
            continue
        for texts in seen:
            mismatches += compare(job, texts, solo.texts)
    return {"greedy_bodies": len(groups), "verified": len(keys), "mismatches": mismatches}


# ----- the whole soak -------------------------------------------------------------------------------
async def warm_up(client: httpx.AsyncClient, model: str) -> None:
    """One short request per endpoint and shape, so first-use costs (kernel builds, thread pools, lazily
    created tasks) are paid before the idle baseline is taken."""
    prompts = ((COMPLETIONS, "prompt", "Warm up"), (CHAT, "messages", [{"role": "user", "content": "Warm up"}]))
    for path, key, prompt in prompts:
        for stream in (False, True):
            body = {"model": model, key: prompt, "max_tokens": 2, "temperature": 0, "stream": stream}
            ex = await send(client, path, body)
            if not ex.complete(1):
                raise RuntimeError(f"the warm-up request to {path} failed: {ex.error or ex.finish}")


def soak_checks(cfg: SoakConfig, outcomes: list[Outcome], idle_before: bool, before: dict, after: dict,
                idle: tuple[bool, str], greedy: dict) -> list[probe.Check]:
    """Every pass/fail line of the report; idle is (went idle?, why not if /metrics failed)."""
    c = counts(outcomes)
    first = next((o for o in outcomes if o.kind == "failed"), None)
    mism, verified = greedy["mismatches"], greedy["verified"]
    detail = (f"{len(mism)} mismatches" if mism else f"of {greedy['greedy_bodies']} distinct bodies"
              if verified else "no completed greedy request to verify")
    return [
        probe.Check("server idle before the soak", idle_before, "yes" if idle_before else "no", "yes"),
        probe.Check("failed requests", c["failed"] == 0, c["failed"], 0,
                    f"first: {first.reason[:120]}" if first else ""),
        probe.Check("completed requests", c["completed"] > 0, c["completed"], "> 0"),
        *probe.leak_checks(before, after, idle[0], cfg.max_rss_growth_mb, idle[1]),
        probe.Check("greedy = alone", verified > 0 and not mism, f"{verified - len(mism)}/{verified}", "all",
                    detail),
    ]


async def run_soak(cfg: SoakConfig) -> dict:
    """Warm up, take the idle baseline, soak, wait for idle, verify greedy outputs; the whole result."""
    from tuneserve.corpus import load_corpus

    t0 = time.perf_counter()
    async with probe.make_client(cfg.base_url, cfg.api_key, cfg.request_timeout) as client:
        model = cfg.model or await probe.served_model(client)
        workload = Workload(model, cfg.seed, cfg.max_tokens, cfg.max_n,
                            load_corpus(cfg.corpus) if cfg.corpus else None)
        await warm_up(client, model)
        before, idle_before, _ = await probe.wait_idle(client, cfg.idle_timeout)
        t1 = time.perf_counter()
        outcomes, elapsed = await load(cfg, workload)
        after, idle, waited, scrape_error = await probe.settle(client, cfg.idle_timeout, before.get(probe.TASKS))
        t2 = time.perf_counter()
        greedy = await verify_greedy(client, outcomes, cfg.verify_max, cfg.seed, cfg.request_timeout)
    greedy["seconds"] = time.perf_counter() - t2
    timings = {"warm_up_s": t1 - t0, "soak_s": elapsed, "idle_wait_s": waited, "verify_s": greedy["seconds"]}
    checks = soak_checks(cfg, outcomes, idle_before, before, after, (idle, scrape_error), greedy)
    by_mode = [{"mode": m, **counts([o for o in outcomes if o.job.mode == m])} for m in MODES]
    server = {v: after.get(probe.P + k, 0.0) - before.get(probe.P + k, 0.0) for k, v in SERVER_COUNTERS.items()}
    return {"config": probe.public_config(cfg), "model": model, "duration_s": elapsed, "timings": timings,
            "counts": counts(outcomes), "by_mode": by_mode, "server_deltas": server,
            "metrics_before": before, "metrics_after": after, "greedy": greedy,
            "checks": [asdict(c) for c in checks], "ok": not probe.failed(checks),
            "failures": [o.to_json() for o in outcomes if o.kind == "failed"][:50]}


# ----- command line -----------------------------------------------------------------------------------
def print_report(result: dict) -> None:
    cfg = result["config"]
    c = result["counts"]
    title = (f"bench soak: {result['model']} at {cfg['base_url']}, {result['duration_s']:.0f} s, "
             f"concurrency {cfg['concurrency']}, seed {cfg['seed']}: {c['sent']} requests "
             f"({c['sent'] / max(result['duration_s'], 1e-9):.1f}/s)")
    rows = [*result["by_mode"], {"mode": "total", **c}]
    print(table(rows, ["mode", "sent", *KINDS], title=title))
    print(table([result["server_deltas"]], list(SERVER_COUNTERS.values()), title="server counters during the soak"))
    print(probe.checks_table([probe.Check(**d) for d in result["checks"]], title="checks"))
    print("seconds: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f}"
                                  for k, v in result["timings"].items()))


def report_failures(result: dict) -> None:
    """The details behind failed checks, on stderr: failed requests and greedy mismatches with their bodies."""
    for f in result["failures"][:5]:
        print(f"failed request: {f['path']} {f['mode']} status {f['status']}: {f['reason']}\n  body: "
              f"{json.dumps(f['body'])[:600]}", file=sys.stderr)
    for m in result["greedy"]["mismatches"][:5]:
        print(f"greedy mismatch: {json.dumps(m)[:1200]}", file=sys.stderr)
    for d in result["checks"]:
        if not d["ok"]:
            print(f"soak check failed: {d['name']}: {d['value']} (limit {d['limit']}) {d['detail']}",
                  file=sys.stderr)


def main(ns: argparse.Namespace) -> int:
    cfg = SoakConfig(base_url=probe.require_loopback(ns.base_url), duration=ns.duration,
                     concurrency=ns.concurrency, seed=ns.seed, max_requests=ns.max_requests,
                     max_tokens=ns.max_tokens, max_n=ns.max_n, request_timeout=ns.request_timeout,
                     idle_timeout=ns.idle_timeout, verify_max=ns.verify_max,
                     max_rss_growth_mb=ns.max_rss_growth_mb, api_key=ns.api_key, model=ns.model, corpus=ns.corpus)
    result = asyncio.run(run_soak(cfg))
    print_report(result)
    write_json(ns.json, result)
    report_failures(result)
    return 0 if result["ok"] else 1


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("soak", help="concurrent misbehaving clients, then leak, error and greedy-output checks")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending at once")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a request")
    p.add_argument("--max-n", type=int, default=3, help="largest n of a request")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request counts as hung")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds to wait for the server to go idle")
    p.add_argument("--verify-max", type=int, default=64, help="distinct greedy bodies to resend alone")
    p.add_argument("--max-rss-growth-mb", type=float, default=256.0, help="server RSS growth allowed (MiB)")
    p.add_argument("--corpus", default=None, help="corpus name or text file for prompts (default: built-in words)")
    probe.add_target_args(p, "write the counts, metrics, checks and failures here")
    p.set_defaults(bench_main=main)
