"""Ray Serve's request-router interface over routing.py's policies.

Ray Serve runs one router per handle, in the caller's process (here: the ingress), and asks it for ranked
replicas per request; of the first rank with room it takes the least loaded. The policy sees the
request's prompt (the payload the ingress sends, see ingress.py), the replicas' ongoing requests from
Ray's queue-length cache, and learns which replica got which prompt from `on_request_routed`.

Two payload fields steer it: `target` (a replica's unique id: the ingress scrapes each replica's
metrics through it) and `avoid` (replica ids ranked last: a retry goes elsewhere).
"""

from __future__ import annotations

import importlib
import weakref

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from tuneserve.deploy.routing import make_policy, prefix_keys, prompt_text

_ROUTERS: weakref.WeakSet = weakref.WeakSet()


def _registry() -> weakref.WeakSet:
    """The process's live routers (the ingress reads the replica list there). Looked up through the
    imported module: Ray may unpickle this class by value, with its own copy of the globals."""
    return importlib.import_module(__name__)._ROUTERS


def live_replica_ids() -> list[str]:
    """Unique ids of the replicas the routers of this process know."""
    return sorted({i for r in list(_registry()) for i in r.replica_ids()})


def _payload(pr: PendingRequest | None) -> dict | None:
    if pr is None or not pr.args or not isinstance(pr.args[0], dict):
        return None
    return pr.args[0]


class TuneserveRouter(RequestRouter):
    """Prefix affinity (or round robin) for the engine replicas; see routing.py."""

    def initialize_state(self, policy: str = "prefix", imbalance: int = 4, chunk_chars: int = 64) -> None:
        self.policy = make_policy(policy, imbalance=imbalance) if policy == "prefix" else make_policy(policy)
        self.chunk_chars = chunk_chars
        _registry().add(self)

    def replica_ids(self) -> list[str]:
        return sorted(r.replica_id.unique_id for r in self._replicas_list)

    def _keys(self, payload: dict | None) -> list[bytes]:
        if payload is None or not isinstance(payload.get("json"), dict):
            return []
        return prefix_keys(prompt_text(payload["json"]), self.chunk_chars)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        payload = _payload(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if payload is not None and payload.get("target") is not None:
            r = by_id.get(payload["target"])
            return [[r]] if r is not None else []
        avoid = set(payload.get("avoid") or ()) if payload is not None else set()
        cands = [r for r in candidate_replicas if r.replica_id.unique_id not in avoid] or candidate_replicas
        loads = {r.replica_id.unique_id: self.replica_queue_len_cache.get(r.replica_id) or 0 for r in cands}
        ranks = [[by_id[i] for i in rank] for rank in self.policy.rank(self._keys(payload), loads)]
        spare = [r for r in candidate_replicas if r not in cands]
        return ranks + [spare] if spare else ranks

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:  # noqa: ANN001
        payload = _payload(pending_request)
        if payload is not None and payload.get("target") is None:
            self.policy.record(self._keys(payload), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)
