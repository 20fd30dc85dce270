"""`tuneserve bench serve`: load any OpenAI-compatible server over HTTP and measure what its clients see.

Metrics as `vllm bench serve` defines them: TTFT from send to the first streamed token chunk; TPOT =
(E2EL - TTFT) / (output tokens - 1) per request; ITL = gaps between streamed chunks, pooled over requests;
E2EL from send to the last chunk; request and token throughput over the whole run; goodput = requests
meeting every SLO per second. Latencies are reported in milliseconds (mean, median, p90, p99), as vLLM does.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tuneserve.bench import load
from tuneserve.bench.exchange import sse_events
from tuneserve.bench.records import percentile, table, write_json

SLO_KEYS = ("ttft", "tpot", "e2el")
STOP_CHECK_S = 0.25  # how often a stop rule is asked during a run
StopRule = Callable[[Sequence["RequestRecord"], float], "str | None"]
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestRecord:
    """What the client saw of one request; times are seconds from the start of the benchmark."""

    index: int
    prompt_len: int
    max_tokens: int
    arrival_s: float = 0.0  # scheduled send time
    send_s: float = 0.0  # actual send time (after waiting for a concurrency slot)
    chunk_s: list[float] = field(default_factory=list)  # arrival of every chunk that carried tokens
    output_tokens: int = 0
    error: str | None = None
    sent: bool = False
    done: bool = False  # ended (tokens, an error or an empty stream); False while in flight or when cut off

    @property
    def success(self) -> bool:
        return self.error is None and bool(self.chunk_s)

    @property
    def ttft(self) -> float | None:
        return self.chunk_s[0] - self.send_s if self.chunk_s else None

    @property
    def e2el(self) -> float | None:
        return self.chunk_s[-1] - self.send_s if self.chunk_s else None

    @property
    def tpot(self) -> float | None:
        if not self.chunk_s or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    def to_json(self) -> dict:
        """The record with its derived latencies, for the JSON report."""
        return {"index": self.index, "success": self.success, "error": self.error,
                "prompt_len": self.prompt_len, "max_tokens": self.max_tokens,
                "output_tokens": self.output_tokens, "done": self.done, "arrival_s": self.arrival_s,
                "send_s": self.send_s,
                "ttft_s": self.ttft, "tpot_s": self.tpot, "e2el_s": self.e2el, "itl_s": self.itls}


# ----- metrics ----------------------------------------------------------------------------------------
def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a successful request met every SLO (a request with one output token has no TPOT to miss)."""
    values = {"ttft": rec.ttft, "tpot": rec.tpot, "e2el": rec.e2el}
    return rec.success and all(values[k] is None or values[k] <= v for k, v in slo.items())


def compute_metrics(records: list[RequestRecord], duration: float,
                    slo: dict[str, float] | None = None) -> dict:
    """Throughput, goodput and latency statistics (ms) of a finished run, keyed like vLLM's JSON."""
    ok = [r for r in records if r.success]
    dur = max(duration, 1e-9)
    in_tok, out_tok = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    m: dict[str, Any] = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_throughput": len(ok) / dur, "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
        "request_goodput": sum(meets_slo(r, slo) for r in ok) / dur if slo else None,
    }
    samples = {"ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
               "itl": [x for r in ok for x in r.itls], "e2el": [r.e2el for r in ok]}
    for name in LATENCIES:
        xs = [x * 1000.0 for x in samples[name]]
        m[f"mean_{name}_ms"] = sum(xs) / len(xs) if xs else None
        m[f"median_{name}_ms"] = percentile(xs, 50)
        m[f"p90_{name}_ms"] = percentile(xs, 90)
        m[f"p99_{name}_ms"] = percentile(xs, 99)
    return m


def parse_slo(text: str | None) -> dict[str, float] | None:
    """'ttft=0.5,tpot=0.05,e2el=10' (seconds) -> {"ttft": 0.5, ...}."""
    if not text:
        return None
    slo = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo takes comma-separated {'/'.join(SLO_KEYS)}=SECONDS, got {part!r}")
        slo[key] = float(val)
        if not slo[key] > 0:
            raise ValueError(f"--slo {key} must be > 0 seconds, got {val}")
    return slo


# ----- the client -------------------------------------------------------------------------------------
class RemoteTokenizer:
    """encode/decode through a server's /tokenize and /detokenize endpoints (tuneserve and vLLM have them)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None) -> None:
        self.client = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=120)
        self.model = model

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        r = self.client.post("/tokenize", json={"model": self.model, "prompt": text,
                                                "add_special_tokens": add_special_tokens})
        _raise_for(r, "/tokenize (or pass --tokenizer MODEL to tokenize locally)")
        return r.json()["tokens"]

    def decode(self, ids: list[int]) -> str:
        r = self.client.post("/detokenize", json={"model": self.model, "tokens": ids})
        _raise_for(r, "/detokenize (or pass --tokenizer MODEL to detokenize locally)")
        return r.json()["prompt"]


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _raise_for(r: httpx.Response, what: str) -> None:
    if r.status_code != 200:
        raise RuntimeError(f"{what} answered HTTP {r.status_code}: {r.text[:300]}")


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model the server lists at /v1/models."""
    r = httpx.get(base_url.rstrip("/") + "/v1/models", headers=_headers(api_key), timeout=30)
    _raise_for(r, "/v1/models")
    return r.json()["data"][0]["id"]


async def _stream_one(client: httpx.AsyncClient, payload: dict, rec: RequestRecord, t0: float) -> None:
    """Send one streaming completion and fill in its record (errors are recorded, never raised)."""
    rec.send_s = time.perf_counter() - t0
    rec.sent = True
    try:
        await _receive(client, payload, rec, t0)
        if not rec.error and not rec.chunk_s:
            rec.error = "the stream ended without any token"
        elif not rec.error and not rec.output_tokens:  # a server without include_usage: one token per chunk
            rec.output_tokens = len(rec.chunk_s)
    except Exception as e:  # noqa: BLE001 - one failed request must not end the benchmark
        rec.error = f"{type(e).__name__}: {e}"
    rec.done = True  # not reached when a stopped run cancels the request


async def _receive(client: httpx.AsyncClient, payload: dict, rec: RequestRecord, t0: float) -> None:
    async with client.stream("POST", "/v1/completions", json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            rec.error = f"HTTP {resp.status_code}: {body[:300]}"
            return
        async for obj in sse_events(resp):
            now = time.perf_counter() - t0
            if obj is None:  # [DONE]
                break
            if "error" in obj:
                rec.error = f"stream error: {obj['error']}"
                return
            if obj.get("choices"):  # a token (its text may be empty, e.g. a special token or half a
                rec.chunk_s.append(now)  # UTF-8 character): vLLM counts these chunks too
            elif obj.get("usage"):
                rec.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
                rec.prompt_len = int(obj["usage"].get("prompt_tokens") or rec.prompt_len)


def _payload(model: str, prompt: str | list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}


async def benchmark(base_url: str, model: str, requests: list[load.BenchRequest], arrivals: list[float],
                    max_concurrency: int | None = None, api_key: str | None = None,
                    prompts: list[str | list[int]] | None = None, progress: bool = True,
                    warmup: bool = True, stop: StopRule | None = None
                    ) -> tuple[list[RequestRecord], float, int, str | None]:
    """Send every request at its arrival time (waiting for a slot under max_concurrency).

    Returns the records, the duration from the first scheduled send to the last response (or to the
    stop), the most requests the client had in flight at once, and why the run was stopped (None: it
    ran to the end). `prompts` overrides what is sent (e.g. decoded text). `stop(records, now)` is asked
    every STOP_CHECK_S; a reason ends the run there: requests in flight are cancelled (the server aborts
    them on the disconnect), the rest are never sent (bench/early_stop.py).
    """
    from tqdm import tqdm

    prompts = prompts if prompts is not None else [r.prompt for r in requests]
    limit = load.ConcurrencyLimit(max_concurrency)
    records = [RequestRecord(i, r.prompt_len, r.output_len, arrival_s=a)
               for i, (r, a) in enumerate(zip(requests, arrivals, strict=True))]
    timeout = httpx.Timeout(None, connect=60.0)
    pool = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                 limits=pool) as client:
        if warmup:  # a short prompt that shares no KV block with the workload
            probe = RequestRecord(-1, 0, 2)
            await _stream_one(client, _payload(model, "Warm up", 2), probe, time.perf_counter())
            if probe.error:
                raise RuntimeError(f"the warm-up request failed: {probe.error}")
        bar = tqdm(total=len(records), desc="bench serve", unit="req", disable=not progress)
        t0 = time.perf_counter()

        async def one(rec: RequestRecord) -> None:
            delay = t0 + rec.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with limit:
                await _stream_one(client, _payload(model, prompts[rec.index], rec.max_tokens), rec, t0)
            bar.update(1)

        stopped = await _run_all([one(r) for r in records], records, t0, stop)
        duration = time.perf_counter() - t0
        bar.close()
    return records, duration, limit.peak, stopped


async def _run_all(coros: list, records: list[RequestRecord], t0: float, stop: StopRule | None) -> str | None:
    """Await every request; with a stop rule, check it as they go and cancel the rest when it fires."""
    every = asyncio.gather(*coros)
    if stop is None:
        await every
        return None
    while True:
        finished, _ = await asyncio.wait([every], timeout=STOP_CHECK_S)
        if finished:
            every.result()
            return None
        why = stop(records, time.perf_counter() - t0)
        if why:
            every.cancel()
            try:
                await every
            except asyncio.CancelledError:
                pass
            return why


def run_benchmark(base_url: str, requests: list[load.BenchRequest], *, model: str | None = None,
                  request_rate: float = math.inf, burstiness: float = 1.0, max_concurrency: int | None = None,
                  slo: dict[str, float] | None = None, seed: int = 0, api_key: str | None = None,
                  tokenizer: Any = None, text_prompts: bool = False, progress: bool = True,
                  stop: StopRule | None = None) -> dict:
    """Run a workload against a server; returns {"config", "metrics", "requests"} (per-request records).
    A run that `stop` ended also has "stopped" (why) and "cut" (each cut-off request's lower bounds, in
    bench/early_stop.py's sense); its metrics cover the requests that ended."""
    base_url = base_url.rstrip("/")
    model = model or served_model(base_url, api_key)
    arrivals = load.arrival_times(len(requests), request_rate, burstiness, seed)
    prompts = None
    if text_prompts:
        tokenizer = tokenizer or RemoteTokenizer(base_url, model, api_key)
        prompts = [tokenizer.decode(r.prompt) for r in requests]
    records, duration, peak, stopped = asyncio.run(benchmark(base_url, model, requests, arrivals, max_concurrency,
                                                             api_key, prompts, progress, stop=stop))
    ended = [r for r in records if r.done]
    metrics = compute_metrics(ended, duration, slo)
    metrics["max_in_flight"] = peak
    config = {"base_url": base_url, "model": model, "num_prompts": len(requests),
              "request_rate": request_rate if math.isfinite(request_rate) else "inf",
              "burstiness": burstiness, "max_concurrency": max_concurrency, "slo_s": slo, "seed": seed,
              "prompt_format": "text" if text_prompts else "ids",
              "workload_sha256": load.fingerprint(requests)}
    out = {"config": config, "metrics": metrics, "requests": [r.to_json() for r in records]}
    if stopped:
        from tuneserve.bench.early_stop import lower_bounds

        out["stopped"] = stopped
        out["cut"] = [lower_bounds(r, duration) for r in records if not r.done]
    return out


# ----- command line -----------------------------------------------------------------------------------
def build_requests(ns: argparse.Namespace, tokenizer_fn) -> list[load.BenchRequest]:  # noqa: ANN001
    """The workload the flags describe; tokenizer_fn() is called only for text datasets."""
    if ns.dataset == "random":
        return load.random_requests(ns.num_prompts, ns.input_len, ns.output_len, ns.seed)
    from tuneserve.corpus import load_corpus

    text, tok = load_corpus(ns.corpus), tokenizer_fn()
    if ns.dataset == "corpus":
        return load.corpus_requests(tok, text, ns.num_prompts, ns.min_input, ns.max_input, ns.output_len,
                                    ns.seed)
    return load.shared_prefix_requests(tok, text, ns.num_prompts, ns.prefix_len, ns.suffix_len, ns.output_len,
                                       ns.seed)


def print_report(result: dict, dataset: str) -> None:
    """The summary and latency tables."""
    cfg, m = result["config"], result["metrics"]
    conc = cfg["max_concurrency"] or "unlimited"
    title = (f"bench serve: {cfg['model']} at {cfg['base_url']}, {dataset} x{cfg['num_prompts']}, "
             f"rate {cfg['request_rate']}/s, burstiness {cfg['burstiness']}, concurrency {conc}")
    summary = {"completed": m["completed"], "failed": m["failed"], "duration_s": m["duration_s"],
               "in_tokens": m["total_input_tokens"], "out_tokens": m["total_output_tokens"],
               "req_s": m["request_throughput"], "out_tok_s": m["output_throughput"],
               "total_tok_s": m["total_token_throughput"], "goodput_req_s": m["request_goodput"],
               "max_in_flight": m["max_in_flight"]}
    print(table([summary], list(summary), title=title))
    stats = ("mean", "median", "p90", "p99")
    rows = [{"latency (ms)": name.upper(), **{s: m[f"{s}_{name}_ms"] for s in stats}} for name in LATENCIES]
    print(table(rows, ["latency (ms)", *stats]))
    if cfg["slo_s"]:
        print("goodput SLOs (s): " + ", ".join(f"{k}<={v}" for k, v in cfg["slo_s"].items()))


def main(ns: argparse.Namespace) -> int:
    slo = parse_slo(ns.slo)
    base_url = ns.base_url.rstrip("/")
    model = ns.model or served_model(base_url, ns.api_key)
    tokenizer = None

    def get_tokenizer() -> Any:
        nonlocal tokenizer
        if tokenizer is None:
            if ns.tokenizer:
                from tuneserve.tokenizer import load_tokenizer
                from tuneserve.weights.sources import resolve

                tokenizer = load_tokenizer(resolve(ns.tokenizer))
            else:
                tokenizer = RemoteTokenizer(base_url, model, ns.api_key)
        return tokenizer

    requests = build_requests(ns, get_tokenizer)
    result = run_benchmark(base_url, requests, model=model, request_rate=ns.request_rate,
                           burstiness=ns.burstiness, max_concurrency=ns.max_concurrency, slo=slo,
                           seed=ns.seed, api_key=ns.api_key, text_prompts=ns.text_prompts,
                           tokenizer=get_tokenizer() if ns.text_prompts else None)
    result["config"]["dataset"] = ns.dataset
    print_report(result, ns.dataset)
    write_json(ns.json, result)
    failed = [r for r in result["requests"] if not r["success"]]
    if failed:
        print(f"{len(failed)} requests failed; first error: {failed[0]['error']}", file=sys.stderr)
    return 1 if failed else 0


def add_parser(sub) -> None:  # noqa: ANN001 - argparse's private subparsers type
    p = sub.add_parser("serve", help="load an OpenAI-compatible server over HTTP: TTFT, TPOT, ITL, goodput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to request (default: the first at /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=["random", "corpus", "shared-prefix"], default="random")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128, help="tokens to generate per request (EOS ignored)")
    p.add_argument("--input-len", type=int, default=256, help="random: prompt tokens")
    p.add_argument("--min-input", type=int, default=64, help="corpus: shortest prompt in tokens")
    p.add_argument("--max-input", type=int, default=512, help="corpus: longest prompt in tokens")
    p.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens of the common prefix")
    p.add_argument("--suffix-len", type=int, default=32, help="shared-prefix: tokens of each distinct suffix")
    p.add_argument("--corpus", default="wikipedia", help="corpus/shared-prefix: corpus name or text file")
    p.add_argument("--tokenizer", default=None,
                   help="tokenize corpus text locally with this model's tokenizer (default: /tokenize)")
    p.add_argument("--text-prompts", action="store_true",
                   help="send prompts as decoded text instead of token ids (for servers that take only text)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1.0: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--slo", default=None, help="goodput SLOs in seconds, e.g. ttft=0.5,tpot=0.05,e2el=10")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the arrival times")
    p.add_argument("--json", default=None, help="write the config, metrics and per-request records here")
    p.set_defaults(bench_main=main)
