"""`tuneserve bench overload`: does the server shed the load it cannot carry, quickly and honestly?

1. Capacity: a closed loop of --concurrency clients (set it near the server's max_num_seqs) sends a fixed
   small workload (short random prompts, --max-tokens tokens each, greedy, streamed) for --capacity-seconds;
   capacity = completed requests per second. A client told 503 waits its Retry-After before the next one.
2. For each of --levels (multiples of capacity, default 0.8 and 3), an open loop sends Poisson arrivals at
   level x capacity for --level-seconds, whatever the answers; the server is let go idle between levels.

Per level: offered rate, sent, admitted (HTTP 200), completed, rejected (503), 503s without Retry-After,
p99 latency of the 503s, hung (no complete answer within --request-timeout), other errors, and the p99 TTFT
of the admitted requests. Checks: nothing hangs, no other error, every admitted request completes, every
503 carries Retry-After and the 503s come back within --max-reject-ms at p99, admitted + rejected == sent
(nothing dropped silently); at the end the server goes idle with no leaked block, request or task.
Only loopback base URLs are accepted (probe.py). Exits 1 when a check fails, naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

from tuneserve.bench import load, probe
from tuneserve.bench.exchange import Exchange, send
from tuneserve.bench.records import percentile, table, write_json
from tuneserve.bench.soak_workload import WORDS

COLUMNS = ("level", "offered_rps", "sent", "admitted", "completed", "rejected", "no_retry_after",
           "p99_reject_ms", "hung", "errors", "p99_ttft_ms", "completed_rps")


@dataclass
class OverloadConfig:
    base_url: str
    concurrency: int = 8
    capacity_seconds: float = 10.0
    levels: tuple[float, ...] = (0.8, 3.0)
    level_seconds: float = 10.0
    max_tokens: int = 16
    prompt_words: int = 32
    request_timeout: float = 120.0
    max_reject_ms: float = 500.0
    idle_timeout: float = 60.0
    max_rss_growth_mb: float | None = 256.0
    seed: int = 0
    api_key: str | None = None
    model: str | None = None


@dataclass
class Shot:
    """One request of a level: what came back, or that nothing complete came back in time."""

    ex: Exchange = field(default_factory=Exchange)
    hung: bool = False

    @property
    def admitted(self) -> bool:
        return not self.hung and self.ex.status == 200

    @property
    def rejected(self) -> bool:
        return not self.hung and self.ex.status == 503


def body(model: str, max_tokens: int, prompt_words: int, seed: int | str) -> dict:
    """The fixed small workload: a distinct short prompt, greedy, exactly max_tokens tokens, streamed."""
    rng = random.Random(seed)
    prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def shoot(client: httpx.AsyncClient, payload: dict, timeout: float) -> Shot:
    shot = Shot()
    try:
        await asyncio.wait_for(send(client, "/v1/completions", payload, ex=shot.ex), timeout)
    except TimeoutError:
        shot.hung = True
    return shot


def retry_after_s(value: str | None) -> float:
    """Retry-After in seconds (1 when absent or not a number of seconds)."""
    try:
        return max(0.0, float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 1.0


async def measure_capacity(client: httpx.AsyncClient, cfg: OverloadConfig, model: str) -> tuple[float, list[Shot]]:
    """Completed requests per second of a closed loop of cfg.concurrency clients; and its shots."""
    shots: list[Shot] = []
    t0 = time.perf_counter()
    deadline = t0 + cfg.capacity_seconds

    async def client_loop(i: int) -> None:
        k = 0
        while time.perf_counter() < deadline:
            payload = body(model, cfg.max_tokens, cfg.prompt_words, seed=f"{cfg.seed}-capacity-{i}-{k}")
            shots.append(await shoot(client, payload, cfg.request_timeout))
            k += 1
            if shots[-1].rejected:  # a closed loop is a polite client: it waits as told before retrying
                left = max(0.0, deadline - time.perf_counter())
                await asyncio.sleep(min(retry_after_s(shots[-1].ex.retry_after), left))

    await asyncio.gather(*(client_loop(i) for i in range(cfg.concurrency)))
    done = sum(s.admitted and s.ex.complete(1) for s in shots)
    return done / (time.perf_counter() - t0), shots


async def offer(client: httpx.AsyncClient, cfg: OverloadConfig, model: str, rate: float,
                seed: int) -> tuple[list[Shot], float]:
    """Open loop: Poisson arrivals at `rate` for cfg.level_seconds, each sent whatever came before."""
    n = max(1, round(rate * cfg.level_seconds))
    arrivals = load.arrival_times(n, rate, seed=seed)
    t0 = time.perf_counter()

    async def one(i: int, at: float) -> Shot:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        return await shoot(client, body(model, cfg.max_tokens, cfg.prompt_words, seed=f"{seed}-{i}"),
                           cfg.request_timeout)

    shots = await asyncio.gather(*(one(i, at) for i, at in enumerate(arrivals)))
    return list(shots), time.perf_counter() - t0


def summarize(level: float, rate: float, shots: list[Shot], elapsed: float) -> dict:
    """One row of the report."""
    admitted = [s for s in shots if s.admitted]
    completed = [s for s in admitted if s.ex.complete(1)]
    rejected = [s for s in shots if s.rejected]
    return {"level": level, "offered_rps": rate, "sent": len(shots), "admitted": len(admitted),
            "completed": len(completed), "rejected": len(rejected),
            "no_retry_after": sum(not s.ex.retry_after for s in rejected),
            "p99_reject_ms": percentile([s.ex.latency * 1000 for s in rejected], 99),
            "hung": sum(s.hung for s in shots),
            "errors": sum(not s.hung and not s.admitted and not s.rejected for s in shots),
            "p99_ttft_ms": percentile([s.ex.ttft * 1000 for s in completed if s.ex.ttft is not None], 99),
            "completed_rps": len(completed) / max(elapsed, 1e-9)}


def first_problem(shots: list[Shot]) -> str:
    """The first error other than a 503, or admitted answer that did not complete, for a check's detail."""
    for s in shots:
        if not s.hung and not s.rejected and not s.ex.complete(1):
            return f"status {s.ex.status}: {(s.ex.error or f'no finish_reason: {s.ex.finish}')[:160]}"
    return ""


def ok_run(row: dict) -> bool:
    """No hang, no error but 503s, every admitted request completed."""
    return row["hung"] == 0 and row["errors"] == 0 and row["completed"] == row["admitted"]


def level_checks(row: dict, shots: list[Shot], max_reject_ms: float) -> list[probe.Check]:
    x = f"x{row['level']:g}: "
    p99 = row["p99_reject_ms"]
    return [
        probe.Check(x + "hung", row["hung"] == 0, row["hung"], 0),
        probe.Check(x + "other errors", row["errors"] == 0, row["errors"], 0, first_problem(shots)),
        probe.Check(x + "admitted completed", row["completed"] == row["admitted"],
                    f"{row['completed']}/{row['admitted']}", "all", first_problem(shots)),
        probe.Check(x + "503 without Retry-After", row["no_retry_after"] == 0, row["no_retry_after"], 0),
        probe.Check(x + "p99 503 latency (ms)", p99 is None or p99 <= max_reject_ms, p99, max_reject_ms),
        probe.Check(x + "admitted + rejected == sent", row["admitted"] + row["rejected"] == row["sent"],
                    f"{row['admitted']} + {row['rejected']} of {row['sent']}", "= sent"),
    ]


async def run_overload(cfg: OverloadConfig, progress: bool = True) -> dict:
    """Capacity, then each level, then the idle and leak checks; the whole result."""
    def say(msg: str) -> None:
        if progress:
            print(f"overload: {msg}", file=sys.stderr, flush=True)

    async with probe.make_client(cfg.base_url, cfg.api_key, cfg.request_timeout, max_connections=None) as client:
        model = cfg.model or await probe.served_model(client)
        warm = await shoot(client, body(model, 2, 4, seed=-1), cfg.request_timeout)
        if not warm.ex.complete(1):
            raise RuntimeError(f"the warm-up request failed: {warm.ex.error or 'hung'}")
        before, idle_before, _ = await probe.wait_idle(client, cfg.idle_timeout)
        say(f"measuring capacity: {cfg.concurrency} clients for {cfg.capacity_seconds:g} s")
        capacity, cap_shots = await measure_capacity(client, cfg, model)
        cap = summarize(0.0, 0.0, cap_shots, cfg.capacity_seconds)
        # a 503 here is the server shedding (--concurrency above what it admits), not a failure
        checks = [probe.Check("server idle before the run", idle_before, "yes" if idle_before else "no", "yes"),
                  probe.Check("capacity run: no hang or error", ok_run(cap) and capacity > 0,
                              f"{cap['completed']} done, {cap['rejected']} 503", "no hang, error",
                              first_problem(cap_shots))]
        rows = []
        for i, level in enumerate(cfg.levels if capacity > 0 else ()):
            await probe.settle(client, cfg.idle_timeout)
            rate = level * capacity
            say(f"x{level:g} capacity: {rate:.2f} req/s for {cfg.level_seconds:g} s")
            shots, elapsed = await offer(client, cfg, model, rate, seed=cfg.seed * 1000 + i)
            rows.append(summarize(level, rate, shots, elapsed))
            checks += level_checks(rows[-1], shots, cfg.max_reject_ms)
        after, idle, _, scrape_error = await probe.settle(client, cfg.idle_timeout, before.get(probe.TASKS))
    checks += probe.leak_checks(before, after, idle, cfg.max_rss_growth_mb, scrape_error)
    return {"config": probe.public_config(cfg), "model": model, "capacity_rps": capacity,
            "capacity_requests": len(cap_shots), "capacity_run": cap, "levels": rows,
            "checks": [asdict(c) for c in checks], "ok": not probe.failed(checks),
            "metrics_before": before, "metrics_after": after}


# ----- command line -----------------------------------------------------------------------------------
def print_report(result: dict) -> None:
    cfg = result["config"]
    title = (f"bench overload: {result['model']} at {cfg['base_url']}; capacity {result['capacity_rps']:.2f} req/s "
             f"({result['capacity_requests']} requests, {cfg['concurrency']} clients, {cfg['max_tokens']} tokens "
             f"each); {cfg['level_seconds']:g} s per level")
    print(table(result["levels"], COLUMNS, title=title))
    for row in result["levels"]:
        if row["level"] > 1 and row["rejected"] == 0:
            print(f"note: nothing was rejected at x{row['level']:g}: the server queued it all (its waiting limit "
                  "is above what this level builds up; --max-waiting-requests or a longer --level-seconds)")
    print(probe.checks_table([probe.Check(**d) for d in result["checks"]], title="checks"))


def parse_levels(text: str) -> tuple[float, ...]:
    levels = tuple(float(x) for x in text.split(",") if x.strip())
    if not levels or any(not v > 0 for v in levels):
        raise ValueError(f"--levels takes positive multiples of capacity, e.g. 0.8,3; got {text!r}")
    return levels


def main(ns: argparse.Namespace) -> int:
    cfg = OverloadConfig(base_url=probe.require_loopback(ns.base_url), concurrency=ns.concurrency,
                         capacity_seconds=ns.capacity_seconds, levels=parse_levels(ns.levels),
                         level_seconds=ns.level_seconds, max_tokens=ns.max_tokens, prompt_words=ns.prompt_words,
                         request_timeout=ns.request_timeout, max_reject_ms=ns.max_reject_ms,
                         idle_timeout=ns.idle_timeout, max_rss_growth_mb=ns.max_rss_growth_mb, seed=ns.seed,
                         api_key=ns.api_key, model=ns.model)
    result = asyncio.run(run_overload(cfg))
    print_report(result)
    write_json(ns.json, result)
    for d in result["checks"]:
        if not d["ok"]:
            print(f"overload check failed: {d['name']}: {d['value']} (limit {d['limit']}) {d['detail']}",
                  file=sys.stderr)
    return 0 if result["ok"] else 1


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("overload", help="capacity, then open-loop load at 0.8x and 3x: 503s, hangs, drops")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients when measuring capacity "
                   "(near the server's max_num_seqs)")
    p.add_argument("--capacity-seconds", type=float, default=10.0)
    p.add_argument("--levels", default="0.8,3", help="offered load as multiples of capacity")
    p.add_argument("--level-seconds", type=float, default=10.0, help="seconds of arrivals per level")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (EOS ignored)")
    p.add_argument("--prompt-words", type=int, default=32, help="words per prompt")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request counts as hung")
    p.add_argument("--max-reject-ms", type=float, default=500.0, help="p99 latency allowed for a 503")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds to wait for the server to go idle")
    p.add_argument("--max-rss-growth-mb", type=float, default=256.0, help="server RSS growth allowed (MiB)")
    p.add_argument("--seed", type=int, default=0)
    probe.add_target_args(p, "write the levels, checks and metrics here")
    p.set_defaults(bench_main=main)
