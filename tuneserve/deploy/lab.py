"""The lab's `replicas` axis: a sweep or tune point served by N engine replicas on a local Ray Serve behind
one endpoint (deploy/local.py), measured through HTTP like a one-server point (bench/sweep_serve.py).

The point's threads are shared out (each replica gets threads / N, and as many Ray CPUs), so that one
large replica and several small ones are compared on the same machine budget. A record's cost counts
every replica (weights, KV cache, threads), read from the replicas' own metrics.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from tuneserve.bench.sweep_serve import REPLICA_SESSIONS, run_at
from tuneserve.deploy.config import DeployConfig
from tuneserve.server.launch import free_port

_COST = {"weight_bytes": "engine_weight_bytes", "kv_cache_bytes": "engine_kv_cache_bytes", "threads": "engine_threads"}


class ReplicaSession:
    """`with ReplicaSession(model, engine_args, threads, replicas) as s: s.run(...)`: one deployment, many runs."""

    def __init__(self, model: str, engine_args: dict[str, Any], threads: int | None, replicas: int) -> None:
        self.model, self.replicas, self.threads = model, replicas, threads
        self.engine_args = {k: v for k, v in engine_args.items() if k != "model"}
        self.load_s = 0.0
        self.cost: dict[str, int] = {}

    def __enter__(self) -> ReplicaSession:
        import torch

        from tuneserve.deploy import require_ray
        from tuneserve.engine_args import EngineArgs
        from tuneserve.tokenizer import load_tokenizer

        require_ray()
        from tuneserve.deploy.local import Deployment

        total = self.threads or torch.get_num_threads()
        per = max(1, total // self.replicas)
        seqs = int(self.engine_args.get("max_num_seqs") or EngineArgs.max_num_seqs)
        cfg = DeployConfig(model=self.model, engine_args=self.engine_args, num_replicas=self.replicas,
                           torch_threads=per, ray_actor_options={"num_cpus": per}, max_ongoing_requests=seqs,
                           max_queued_requests=100_000, server={"max_waiting_requests": 100_000})
        m = EngineArgs(model=self.model, **self.engine_args).create_engine_config().model
        self.tokenizer = load_tokenizer(m.path, m.tokenizer)
        t0 = time.perf_counter()
        self.dep = Deployment(cfg, port=free_port(), num_cpus=per * self.replicas)
        self.load_s = time.perf_counter() - t0
        try:
            self.cost = self._cost()
        except BaseException:
            self.dep.close()
            raise
        return self

    def _cost(self) -> dict[str, int]:
        """Weights, KV cache and threads summed over the replicas' metrics pages (the ingress's /metrics)."""
        page = httpx.get(self.dep.url + "/metrics", timeout=60).text
        cost = {}
        for key, metric in _COST.items():
            values = re.findall(rf"^tuneserve:{metric}{{[^}}]*}} (\S+)$", page, re.M)
            if len(values) != self.replicas:
                raise RuntimeError(f"/metrics has {metric} of {len(values)} replicas, not {self.replicas}")
            cost[key] = int(sum(float(v) for v in values))
        cost["memory_bytes"] = cost["weight_bytes"] + cost["kv_cache_bytes"]
        return cost

    def run(self, workload: str, num_prompts: int, output_len: int, rate: float | None,
            seed: int = 0, stop: Any = None) -> dict[str, Any]:  # stop: bench.serve.StopRule
        return run_at(self.dep.url, self.tokenizer, workload, num_prompts, output_len, rate, seed,
                      {**self.cost, "load_s": self.load_s, "replicas": self.replicas}, stop)

    def __exit__(self, *exc: object) -> None:
        self.dep.close()


REPLICA_SESSIONS.append(ReplicaSession)
