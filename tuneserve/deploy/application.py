"""The Ray Serve application: N engine replicas behind one ingress, routed by prefix affinity.

(Not named app.py: `tuneserve.deploy:app` is the application object, and a submodule would shadow it.)
"""

from __future__ import annotations

import dataclasses

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from tuneserve.deploy.config import DeployConfig
from tuneserve.deploy.ingress import Ingress
from tuneserve.deploy.replica import EngineReplica
from tuneserve.deploy.router import TuneserveRouter


def build_app(cfg: DeployConfig) -> Application:
    """The application `serve.run` deploys (autoscaling_config and ray_actor_options passed through)."""
    router = RequestRouterConfig(request_router_class=TuneserveRouter,
                                 request_router_kwargs={"policy": cfg.routing, "imbalance": cfg.route_imbalance})
    actor_options = {"num_cpus": cfg.torch_threads or 1, **cfg.ray_actor_options}
    scale = {"autoscaling_config": cfg.autoscaling_config} if cfg.autoscaling_config else \
        {"num_replicas": cfg.num_replicas}
    replica = serve.deployment(EngineReplica, name="EngineReplica").options(
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        ray_actor_options=actor_options, health_check_period_s=cfg.health_check_period_s,
        health_check_timeout_s=cfg.health_check_timeout_s,
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s, request_router_config=router, **scale)
    # the ingress only relays: no CPU reserved, and never the queue that fills first
    ingress = serve.deployment(Ingress, name="Ingress").options(
        max_ongoing_requests=cfg.ingress_max_ongoing_requests, ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s)
    return ingress.bind(replica.bind(dataclasses.asdict(cfg)))
