"""What the server says about itself, for `bench soak` and `bench overload`: loopback-only clients,
/metrics snapshots, waiting for idle, and the leak checks (blocks, references, requests, tasks, memory).

These tools hammer a server with disconnects and overload, so they refuse any address but this machine's
loopback, and their clients ignore proxy settings from the environment (a proxy would leave the machine).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from tuneserve.bench.records import table

P = "tuneserve:"
IDLE_GAUGES = (P + "num_requests_running", P + "num_requests_waiting", P + "engine_live_requests",
               P + "kv_blocks_in_use", P + "kv_block_refs")
TASKS = P + "server_asyncio_tasks"
ERRORS = P + "engine_errors_total"
RSS = "process_resident_memory_bytes"


def require_loopback(base_url: str) -> str:
    """base_url without its trailing slash; ValueError unless it is http(s) to localhost or a loopback IP."""
    parts = urlsplit(base_url)
    host = (parts.hostname or "").lower()
    ok = parts.scheme in ("http", "https") and host == "localhost"
    if not ok and parts.scheme in ("http", "https"):
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(f"refusing {base_url!r}: soak and overload only target this machine's loopback "
                         "(http://127.0.0.1:PORT, http://localhost:PORT or http://[::1]:PORT)")
    return base_url.rstrip("/")


def make_client(base_url: str, api_key: str | None = None, timeout: float | None = 60.0,
                max_connections: int | None = 100) -> httpx.AsyncClient:
    """An async client bound to a loopback base URL, with no environment proxies."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=require_loopback(base_url), headers=headers, timeout=timeout,
                             limits=limits, trust_env=False)


def add_target_args(p, json_help: str) -> None:  # noqa: ANN001 - an argparse parser
    """The flags every loopback tool shares: the server, the model to ask for, its key, the JSON report."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a loopback URL (others are refused)")
    p.add_argument("--model", default=None, help="model name to request (default: the first at /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", default=None, help=json_help)


async def served_model(client: httpx.AsyncClient) -> str:
    """The first model listed at /v1/models."""
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise RuntimeError(f"/v1/models answered HTTP {r.status_code}: {r.text[:300]}")
    return r.json()["data"][0]["id"]


def public_config(cfg: Any) -> dict:
    """A run's config dataclass for its report, with the API key masked."""
    out = asdict(cfg)
    if out.get("api_key"):
        out["api_key"] = "***"
    return out


# ----- /metrics ---------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets}.

    A family exported without samples (a counter nothing has incremented yet) reads as 0, so "exported
    and zero" and "not exported" stay distinguishable.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if not fam.samples:
            out.setdefault(fam.name + ("_total" if fam.type == "counter" else ""), 0.0)
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    r = await client.get("/metrics")
    if r.status_code != 200:
        raise RuntimeError(f"/metrics answered HTTP {r.status_code}: {r.text[:300]}")
    return parse_metrics(r.text)


def is_idle(snap: dict[str, float], task_baseline: float | None = None) -> bool:
    """No request, block or reference left (missing gauges count as busy), tasks back to the baseline."""
    if any(snap.get(k, 1.0) != 0 for k in IDLE_GAUGES):
        return False
    return task_baseline is None or snap.get(TASKS, float("inf")) <= task_baseline


async def wait_idle(client: httpx.AsyncClient, timeout: float,
                    task_baseline: float | None = None) -> tuple[dict[str, float], bool, float]:
    """Poll /metrics until the server is idle or timeout seconds pass: (last snapshot, idle?, seconds)."""
    t0 = time.perf_counter()
    while True:
        snap = await scrape(client)
        waited = time.perf_counter() - t0
        if is_idle(snap, task_baseline) or waited >= timeout:
            return snap, is_idle(snap, task_baseline), waited
        await asyncio.sleep(0.2)


async def settle(client: httpx.AsyncClient, timeout: float,
                 task_baseline: float | None = None) -> tuple[dict[str, float], bool, float, str]:
    """wait_idle that never raises: a server that stopped answering /metrics is reported, with the error."""
    try:
        return (*await wait_idle(client, timeout, task_baseline), "")
    except (RuntimeError, httpx.HTTPError, ValueError) as e:
        return {}, False, 0.0, f"/metrics failed: {type(e).__name__}: {e}"[:200]


# ----- checks -----------------------------------------------------------------------------------------
@dataclass
class Check:
    """One pass/fail line of a report."""

    name: str
    ok: bool
    value: Any = None
    limit: Any = None
    detail: str = ""


def leak_checks(before: dict[str, float], after: dict[str, float], idle: bool,
                max_rss_growth_mb: float | None, idle_detail: str = "") -> list[Check]:
    """The idle server after a run against the idle server before it."""
    out = [Check("server went idle", idle, "yes" if idle else "no", "yes", idle_detail)]
    for name in IDLE_GAUGES:
        v = after.get(name)
        out.append(Check(name.removeprefix(P), v == 0, v, 0, "" if v is not None else "not exported"))
    for name, label in ((TASKS, "leaked asyncio tasks"), (ERRORS, "engine errors")):
        if name in before and name in after:
            delta = after[name] - before[name]
            out.append(Check(label, delta <= 0, delta, 0, f"{before[name]:g} before, {after[name]:g} after"))
        else:
            out.append(Check(label, False, None, 0, f"{name} not exported"))
    if RSS in before and RSS in after:
        growth = (after[RSS] - before[RSS]) / 2**20
        ok = max_rss_growth_mb is None or growth <= max_rss_growth_mb
        out.append(Check("RSS growth (MiB)", ok, growth, max_rss_growth_mb,
                         f"{before[RSS] / 2**20:,.0f} -> {after[RSS] / 2**20:,.0f} MiB"))
    else:
        out.append(Check("RSS growth (MiB)", max_rss_growth_mb is None, None, max_rss_growth_mb,
                         f"{RSS} not exported"))
    return out


def checks_table(checks: list[Check], title: str | None = None) -> str:
    rows = [{**asdict(c), "ok": "ok" if c.ok else "FAIL"} for c in checks]
    return table(rows, ["name", "value", "limit", "ok", "detail"], title=title)


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]
