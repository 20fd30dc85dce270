"""Start the replicated deployment: on a Ray cluster (`tuneserve deploy ray`) or a local one
(`tuneserve serve --replicas N`, the benchmark, tests)."""

from __future__ import annotations

import signal
import sys
import threading
import time

import ray
from ray import serve

from tuneserve.deploy.application import build_app
from tuneserve.deploy.config import DeployConfig


class Deployment:
    """Ray (joined or started), Serve's HTTP proxy on host:port, and the application; `close()` undoes
    what this object started (a cluster it joined keeps running)."""

    def __init__(self, cfg: DeployConfig, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                 num_cpus: int | None = None) -> None:
        self.cfg = cfg
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            # no dashboard: it is heavy, and nothing here needs it
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     logging_level="WARNING")
        serve.start(http_options={"host": host, "port": port})
        self.deploy(cfg)

    def deploy(self, cfg: DeployConfig) -> None:
        """Run `cfg`'s application (replacing one of the same name); returns once every replica is up."""
        self.cfg = cfg
        t0 = time.time()
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
        print(f"[tuneserve] {cfg.num_replicas or 'autoscaled'} replica(s) of {cfg.model} up in "
              f"{time.time() - t0:.0f} s at {self.url} (routing: {cfg.routing})", file=sys.stderr, flush=True)

    def undeploy(self) -> None:
        serve.delete(self.cfg.app_name)

    def close(self) -> None:
        try:
            serve.shutdown()
        finally:
            if self.started_ray:
                ray.shutdown()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_forever(cfg: DeployConfig, host: str, port: int, address: str | None = None,
                  num_cpus: int | None = None) -> int:
    """Deploy and block until SIGINT/SIGTERM, then shut down what was started."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Deployment(cfg, host, port, address, num_cpus) as d:
        print(f"[tuneserve] serving on {d.url} (OpenAI API at /v1, per-replica metrics at /metrics); "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        stop.wait()
    return 0
