"""Replica choice, free of Ray: prefix affinity with a load-balance fallback, and round robin.

A replica's prefix cache holds the KV blocks of the prompts it served, so a request whose prompt starts
like an earlier one is cheapest where that one ran. The router cannot see the replicas' caches; it keeps
its own record of which replica last served each prompt prefix, as chained hashes of the prompt text's
leading fixed-size chunks (hash i covers chunks 0..i, so one lookup per chunk finds the longest prefix
seen before). Text chunks stand in for token blocks: the ingress does not tokenize, and equal text gives
equal tokens.

Affinity is given up when it would pile work on one replica: if the replica with the prefix has more
than `imbalance` requests beyond the least-loaded candidate, the request goes by power of two choices
(two random candidates, the less loaded one). A prompt with no known prefix goes to the least-loaded
replica, ties broken by the fewest prefixes owned, so that new prefixes spread over the replicas.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence


def prompt_text(body: dict) -> str:
    """The text a request's prompt starts with: a completion's prompt (the first one of a batch; token ids
    as text) or a chat's messages, role and content, in order."""
    if "messages" in body and isinstance(body["messages"], list):
        parts = []
        for m in body["messages"]:
            if not isinstance(m, dict):
                continue
            content = m.get("content")
            if isinstance(content, list):  # content parts: their text
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{m.get('role', '')}: {content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, list):
        return " ".join(str(t) for t in prompt)
    return prompt if isinstance(prompt, str) else ""


def prefix_keys(text: str, chunk_chars: int = 64, max_chunks: int = 256) -> list[bytes]:
    """Chained hashes of the text's whole leading chunks (a partial last chunk is left out: caches hold
    whole blocks). Key i identifies chunks 0..i together."""
    keys, h = [], b""
    for i in range(min(len(text) // chunk_chars, max_chunks)):
        h = hashlib.blake2b(h + text[i * chunk_chars:(i + 1) * chunk_chars].encode("utf-8", "surrogatepass"),
                            digest_size=12).digest()
        keys.append(h)
    return keys


class PrefixAffinity:
    """Which replica to send a prompt to. Replicas are any hashable ids; loads are ongoing requests."""

    def __init__(self, imbalance: int = 4, capacity: int = 200_000, seed: int | None = None) -> None:
        self.imbalance = imbalance  # queue-length gap beyond which load wins over affinity
        self.capacity = capacity  # prefix keys remembered (least recently used dropped first)
        self.owner: OrderedDict[bytes, Hashable] = OrderedDict()
        self.owned: dict[Hashable, int] = {}  # keys per replica (spreads new prefixes)
        self.rng = random.Random(seed)

    def match(self, keys: Sequence[bytes], candidates: Sequence[Hashable]) -> tuple[Hashable | None, int]:
        """(replica that last served the longest known prefix among the candidates, chunks matched)."""
        allowed = set(candidates)
        for i in range(len(keys) - 1, -1, -1):
            r = self.owner.get(keys[i])
            if r is not None and r in allowed:
                return r, i + 1
        return None, 0

    def rank(self, keys: Sequence[bytes], loads: dict[Hashable, int]) -> list[list[Hashable]]:
        """Candidates in order of preference, as ranks (the caller takes the first rank with room, the
        least loaded in it). `loads`: every candidate's ongoing requests."""
        if not loads:
            return []
        cands = list(loads)
        least = min(loads.values())
        owner, _ = self.match(keys, cands)
        if owner is not None and loads[owner] - least <= self.imbalance:
            first = owner
        elif owner is not None:  # affinity would overload its replica: power of two choices
            pair = self.rng.sample(cands, 2) if len(cands) > 2 else cands
            first = min(pair, key=lambda r: loads[r])
        else:  # a new prefix: among replicas not overloaded, the one holding the fewest prefixes, so that the
            # prefixes (and the caches' work) spread evenly; a short queue matters less than a cache that fits
            near = [r for r in cands if loads[r] - least <= self.imbalance]
            first = min(near, key=lambda r: (self.owned.get(r, 0), loads[r], self.rng.random()))
        rest = sorted((r for r in cands if r != first), key=lambda r: loads[r])
        return [[first], rest] if rest else [[first]]

    def record(self, keys: Sequence[bytes], replica: Hashable) -> None:
        """`replica` now holds these prefixes (it was sent the prompt)."""
        for k in keys:
            old = self.owner.pop(k, None)
            if old is not None:
                self.owned[old] -= 1
            self.owner[k] = replica
            self.owned[replica] = self.owned.get(replica, 0) + 1
        while len(self.owner) > self.capacity:
            _, old = self.owner.popitem(last=False)
            self.owned[old] -= 1

    def forget(self, replica: Hashable) -> None:
        """A replica is gone (its cache with it)."""
        for k in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[k]
        self.owned.pop(replica, None)


class RoundRobin:
    """The baseline: each replica in turn, whatever the prompt (ids in sorted order, so it is stable)."""

    def __init__(self) -> None:
        self.n = 0

    def rank(self, keys: Sequence[bytes], loads: dict[Hashable, int]) -> list[list[Hashable]]:
        if not loads:
            return []
        cands = sorted(loads, key=str)
        first = cands[self.n % len(cands)]
        self.n += 1
        return [[first], [r for r in cands if r != first]] if len(cands) > 1 else [[first]]

    def record(self, keys: Sequence[bytes], replica: Hashable) -> None:
        pass

    def forget(self, replica: Hashable) -> None:
        pass


def make_policy(name: str, **kwargs) -> PrefixAffinity | RoundRobin:
    if name == "prefix":
        return PrefixAffinity(**kwargs)
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"routing must be 'prefix' or 'round_robin', got {name!r}")
