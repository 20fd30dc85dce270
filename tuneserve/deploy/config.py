"""DeployConfig: what a replicated deployment runs, read from a YAML or JSON file, the environment or flags.

```yaml
model: smollm2-135m
engine_args: {max_num_seqs: 16}          # any EngineArgs field
server: {max_waiting_requests: 64}       # any ServerSettings field (limits excepted)
num_replicas: 2                          # or autoscaling_config (passed to Ray Serve as is)
max_ongoing_requests: 16                 # per replica; more wait in the caller's queue
max_queued_requests: 64                  # that queue; beyond it the ingress answers 503 with Retry-After
ray_actor_options: {num_cpus: 1}
health_check_period_s: 5
torch_threads: 1                         # per replica
routing: prefix                          # or round_robin
```
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneserve.engine_args import EngineArgs
from tuneserve.server.settings import ServerSettings

ENV_CONFIG = "TUNESERVE_DEPLOY_CONFIG"  # a config file for `serve run tuneserve.deploy:app`
ENV_MODEL = "TUNESERVE_MODEL"  # or just a model (the rest defaults)
ENV_REPLICAS = "TUNESERVE_REPLICAS"


@dataclass
class DeployConfig:
    model: str = EngineArgs.model
    engine_args: dict[str, Any] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)
    served_model_name: str | None = None
    num_replicas: int | None = 2  # None with autoscaling_config
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    ray_actor_options: dict[str, Any] = field(default_factory=dict)
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0  # a replica being stopped finishes its requests this long
    torch_threads: int | None = 1
    routing: str = "prefix"  # prefix | round_robin
    route_imbalance: int = 4  # ongoing-request gap beyond which load wins over prefix affinity
    ingress_max_ongoing_requests: int = 1024  # the ingress only relays; it must not be the bottleneck
    app_name: str = "tuneserve"
    route_prefix: str = "/"

    def __post_init__(self) -> None:
        if self.routing not in ("prefix", "round_robin"):
            raise ValueError(f"routing must be 'prefix' or 'round_robin', got {self.routing!r}")
        if self.autoscaling_config is not None:
            self.num_replicas = None
        elif self.num_replicas is None or self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1 (or give autoscaling_config), got {self.num_replicas}")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        bad = sorted(set(self.engine_args) - names)
        if bad:
            raise ValueError(f"engine_args: unknown {bad}; known: {sorted(names)}")
        names = {f.name for f in dataclasses.fields(ServerSettings)} - {"limits"}
        bad = sorted(set(self.server) - names)
        if bad:
            raise ValueError(f"server: unknown {bad}; known: {sorted(names)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeployConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown deploy config keys {bad}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> DeployConfig:
        text = Path(path).read_text()
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml  # Ray Serve depends on PyYAML, so the [ray] extra brings it

            data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a deploy config is a mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_env(cls) -> DeployConfig:
        if os.environ.get(ENV_CONFIG):
            return cls.from_file(os.environ[ENV_CONFIG])
        d: dict[str, Any] = {}
        if os.environ.get(ENV_MODEL):
            d["model"] = os.environ[ENV_MODEL]
        if os.environ.get(ENV_REPLICAS):
            d["num_replicas"] = int(os.environ[ENV_REPLICAS])
        return cls.from_dict(d)

    def engine(self) -> EngineArgs:
        return EngineArgs(model=self.model, **self.engine_args)

    def settings(self) -> ServerSettings:
        # the replica's engine failing for good must fail its health check (Ray replaces it), not exit
        return ServerSettings(**{"served_model_name": self.served_model_name or self.model, **self.server,
                                 "exit_on_fatal": False})

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
