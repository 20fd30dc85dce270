"""The driver's side of a tensor-parallel group: start ranks 1..N-1, size their KV caches, send each
forward's batch to them, and notice when one dies.

The scheduler and the KV manager stay in the driver (rank 0), which also samples; the other ranks only
run forwards. A rank that dies (or a forward that fails on the driver between two all-reduces, which
would leave the ranks out of step) fails the engine with EngineFatalError: the server exits non-zero and
its supervisor restarts it, and no client waits forever.
"""

from __future__ import annotations

import os
import socket
import time
import uuid

import torch
import torch.multiprocessing as mp

from tuneserve.config import EngineConfig
from tuneserve.errors import EngineFatalError
from tuneserve.log import log
from tuneserve.parallel.comm import Comm, RankFailure
from tuneserve.parallel.rank import CommPlan, Span, rank_main

SLOT_BYTES_MAX = 8 << 20


def comm_kind(choice: str, device: str) -> str:
    """auto: NCCL on CUDA, the shared buffer on CPU; torch: torch.distributed's own (gloo on CPU)."""
    if device.startswith("cuda"):
        return "nccl"
    return "gloo" if choice == "torch" else "shm"


def rank_cpus(world: int, threads: int) -> list[list[int]]:
    """The CPUs of each rank: `threads` torch threads shared out, each rank a run of the allowed CPUs (rank 0,
    the driver, takes the first run; the driver is not pinned, its server threads go where they may)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per = max(1, min(threads, len(cpus)) // world)
    return [[cpus[(r * per + i) % len(cpus)] for i in range(per)] for r in range(world)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """Ranks 1..N-1 of a tensor-parallel group, as seen from the driver."""

    def __init__(self, config: EngineConfig, all_reduce: str = "auto") -> None:
        self.world = config.tensor_parallel_size
        kind = comm_kind(all_reduce, config.device)
        a = config.model.arch
        slot = min(SLOT_BYTES_MAX, config.scheduler.max_num_batched_tokens * a.hidden_size * 4)
        address = f"tuneserve-tp-{uuid.uuid4().hex[:12]}" if kind == "shm" else f"tcp://127.0.0.1:{_free_port()}"
        self.plan = CommPlan(kind, self.world, address, slot)
        self.threads = torch.get_num_threads()
        cpus = rank_cpus(self.world, self.threads)
        self.threads_per_rank = len(cpus[0])
        torch.set_num_threads(self.threads_per_rank)  # restored by close()
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        self.comm: Comm | None = None
        self.closed = False
        self.weight_bytes: list[int] = []  # of ranks 1.., reported when loaded
        if kind == "shm":  # the buffer exists before any rank attaches
            self.comm = self.plan.connect(0, self.why_dead)
        for rank in range(1, self.world):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(config, rank, self.plan, theirs, cpus[rank]), daemon=True,
                            name=f"tuneserve-tp-rank{rank}")
            p.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(p)
        if self.comm is None:
            self.comm = self.plan.connect(0, self.why_dead)
        log(f"tensor parallel: {self.world} ranks, all-reduce {kind}, {len(cpus[0])} threads per rank "
            f"(ranks 1.. pinned to CPUs {cpus[1:]})")

    def why_dead(self) -> str | None:
        """Why the group cannot go on (None: every rank is alive)."""
        for rank, p in enumerate(self.procs, 1):
            if not p.is_alive():
                return f"tensor-parallel rank {rank} exited with code {p.exitcode}"
        return None

    def start(self, num_blocks: list[int], timeout_s: float = 1800.0) -> None:
        """Give every rank its KV cache size and wait until all have loaded their shards."""
        for c in self.conns:
            c.send(num_blocks)
        deadline = time.monotonic() + timeout_s
        for rank, c in enumerate(self.conns, 1):
            while not c.poll(0.2):
                why = self.why_dead()
                if why or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(why or f"tensor-parallel rank {rank} did not load in {timeout_s:.0f} s")
            self.weight_bytes.append(c.recv())

    def send(self, spans: list[Span]) -> None:
        """Start the same forward on every other rank (the driver runs its own part next)."""
        why = self.why_dead()
        if why is not None:
            raise EngineFatalError(why)
        try:
            for c in self.conns:
                c.send(spans)
        except (BrokenPipeError, OSError) as e:
            raise EngineFatalError(f"{self.why_dead() or 'a tensor-parallel rank is gone'} ({e})") from e

    def failed(self, e: BaseException) -> EngineFatalError:
        """The fatal error for a forward that failed on the driver: the ranks are out of step now."""
        why = self.why_dead()
        if isinstance(e, RankFailure) or why:
            return EngineFatalError(why or str(e))
        return EngineFatalError(f"a tensor-parallel forward failed on rank 0 ({type(e).__name__}: {e}); the "
                                "ranks are out of step")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for c in self.conns:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in self.conns:
            c.close()
        self.conns, self.procs = [], []
        if self.comm is not None:
            self.comm.close()
            self.comm = None
        torch.set_num_threads(self.threads)
