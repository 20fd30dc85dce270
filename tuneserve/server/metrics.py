"""Prometheus metrics under vLLM's names with the `tuneserve:` prefix (shared/ANCHORS.md).

Gauges and counters are read from the engine's own counters at scrape time (one source of truth);
latency histograms are observed as requests finish.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tuneserve.outputs import RequestOutput

P = "tuneserve:"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Reads the engine's gauges and counters when /metrics is scraped."""

    def __init__(self, engine, model_name: str) -> None:  # noqa: ANN001 - LLMEngine
        self.engine, self.model = engine, model_name
        self.footprint: dict[str, int] | None = None

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        s = self.engine.get_stats()
        lbl = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(P + name, doc, labels=lbl)
            g.add_metric([self.model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(P + name, doc, labels=lbl)
            c.add_metric([self.model], value)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).", s.kv_cache_usage)
        yield counter("prompt_tokens", "Prompt tokens received.", s.prompt_tokens)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield counter("num_preemptions", "Requests preempted (recomputed later).", s.num_preemptions)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        ok = CounterMetricFamily(P + "request_success", "Finished requests by reason.",
                                 labels=lbl + ["finished_reason"])
        for reason, n in sorted(s.finished.items()):
            ok.add_metric([self.model, reason], n)
        yield ok
        yield gauge("kv_blocks_in_use", "KV blocks held by live requests (0 when idle: the leak check).",
                    s.num_blocks_in_use)
        yield gauge("kv_block_refs", "References held on KV blocks (0 when idle: the leak check).", s.num_block_refs)
        yield gauge("engine_live_requests", "User requests the engine still tracks.", s.num_live_requests)
        if self.footprint is None:  # fixed for the engine's life
            self.footprint = self.engine.footprint()
        yield gauge("engine_weight_bytes", "Bytes of the model's weights (all ranks, and a draft model).",
                    self.footprint["weight_bytes"])
        yield gauge("engine_kv_cache_bytes", "Bytes of the KV cache.", self.footprint["kv_cache_bytes"])
        yield gauge("engine_threads", "Torch threads the engine computes on (all ranks).", self.footprint["threads"])
        errors = CounterMetricFamily(P + "engine_errors", "Engine errors by kind (request: pinned to one "
                                     "request; step: failed a whole step and reset the engine).",
                                     labels=lbl + ["kind"])
        for kind, n in sorted(s.errors.items()):
            errors.add_metric([self.model, kind], n)
        yield errors
        yield counter("spec_decode_num_drafts", "Speculative draft rounds.", s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.", s.spec_num_accepted_tokens)
        per_pos = CounterMetricFamily(P + "spec_decode_num_accepted_tokens_per_pos", "Accepted drafts by position.",
                                      labels=lbl + ["position"])
        for i, n in enumerate(s.spec_accepted_per_pos):
            per_pos.add_metric([self.model, str(i)], n)
        yield per_pos


class ServerMetrics:
    """The registry behind /metrics."""

    def __init__(self, engine, model_name: str) -> None:  # noqa: ANN001
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc. (Linux)
        self.model = model_name
        lbl = ["model_name"]

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(P + name, doc, lbl, buckets=_LATENCY_BUCKETS, registry=self.registry)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to first token.")
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.")
        self.auth_failures = Counter(P + "api_key_failures", "Requests refused for a missing or wrong API key.",
                                     registry=self.registry)
        self.rejected = Counter(P + "requests_rejected", "Requests refused before the engine, by reason.",
                                ["reason"], registry=self.registry)
        self.tasks = Gauge(P + "server_asyncio_tasks", "asyncio tasks alive in the server's event loop "
                           "(the leak check: back to its idle value once requests end).", registry=self.registry)

    def observe(self, out: RequestOutput) -> None:
        """Record a finished request's latencies."""
        m = out.metrics
        if m.ttft is not None:
            self.ttft.labels(self.model).observe(m.ttft)
        for gap in m.inter_token_latencies:
            self.itl.labels(self.model).observe(gap)
        if m.e2e is not None:
            self.e2e.labels(self.model).observe(m.e2e)
        if m.queue_time is not None:
            self.queue.labels(self.model).observe(m.queue_time)

    def render(self) -> bytes:
        return generate_latest(self.registry)
