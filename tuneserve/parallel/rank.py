"""One tensor-parallel rank: load the model, keep this rank's shard, then run every forward the driver
sends. Ranks 1..N-1 run `rank_main` in their own process; the driver (rank 0) calls `load_shard` in the
engine's. A rank that fails exits non-zero; the driver sees it and fails the engine (parallel/group.py).
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass

import torch

from tuneserve.config import EngineConfig
from tuneserve.core.kv_layout import kv_groups
from tuneserve.core.step_io import ScheduledRequest
from tuneserve.kernels.config import bind_kernels
from tuneserve.kernels.config import resolve as resolve_kernels
from tuneserve.loading import load_model
from tuneserve.log import log
from tuneserve.parallel.comm import Comm, ShmComm, TorchComm, torch_group
from tuneserve.parallel.shard import local_kv_heads, shard_model
from tuneserve.quant.linear import model_weight_bytes
from tuneserve.worker.kv_cache import build_kv
from tuneserve.worker.model_runner import ModelRunner

Span = tuple[list[int], int, tuple[list[int], ...]]  # token ids, start position, block table per KV group


@dataclass(frozen=True)
class CommPlan:
    """How the ranks of a group reach each other: the all-reduce kind and its rendezvous."""

    kind: str  # "shm" | "gloo" | "nccl"
    world: int
    address: str  # shm: the shared buffer's name; gloo/nccl: tcp://host:port of the store
    slot_bytes: int = 0
    timeout_s: float = 600.0

    def connect(self, rank: int, alive) -> Comm:  # noqa: ANN001 - () -> str | None
        if self.kind == "shm":
            return ShmComm(self.address, rank, self.world, self.slot_bytes, alive, self.timeout_s, create=rank == 0)
        return TorchComm(torch_group(self.address, rank, self.world, self.kind, self.timeout_s), rank, self.world)


def load_shard(config: EngineConfig, rank: int, comm: Comm) -> torch.nn.Module:
    """The model as every rank loads it, reduced to rank's shard and bound to its kernels again."""
    m = config.model
    kernels = resolve_kernels(m.kernels, m.quant_activations, m.prompt_attention)
    model = load_model(m.path, m.arch, torch.device(config.device), m.dtype, quantization=m.quantization,
                       kernels=kernels)
    fallback = shard_model(model, rank, config.tensor_parallel_size, comm)
    bind_kernels(model, kernels)
    if fallback and rank == 0:
        log(f"tensor parallel: {len(fallback)} quantized layers split through fp32 (their split falls inside a "
            f"group, or act-order), e.g. {fallback[0]}")
    return model


def requests_of(spans: list[Span]) -> list[ScheduledRequest]:
    return [ScheduledRequest("", ids, start, table, None, sample=False) for ids, start, table in spans]


def rank_main(config: EngineConfig, rank: int, plan: CommPlan, conn, cpus: list[int]) -> None:  # noqa: ANN001
    """A worker rank's process: load, shard, build the KV cache the driver sizes, then serve forwards until
    the driver closes the pipe."""
    parent = os.getppid()
    os.environ["TUNESERVE_QUIET"] = "1"  # the driver speaks for the group
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))  # rank_cpus gives every rank at least one
        if config.device.startswith("cuda"):
            torch.cuda.set_device(rank)
        torch.manual_seed(config.model.seed)
        comm = plan.connect(rank, lambda: None if os.getppid() == parent else "the driver exited")
        model = load_shard(config, rank, comm)
        num_blocks = conn.recv()
        groups = kv_groups(config)
        kv = build_kv(config, groups, num_blocks, local_kv_heads(config.model.arch, plan.world))
        runner = ModelRunner(config, model, kv)
        conn.send(model_weight_bytes(model))  # ready
        serve(runner, conn)
        comm.close()
    except (EOFError, KeyboardInterrupt):
        sys.exit(0)  # the driver is gone
    except BaseException:  # noqa: BLE001 - reported, then the driver sees this rank exit
        sys.stderr.write(f"tensor-parallel rank {rank} failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)


@torch.inference_mode()
def serve(runner: ModelRunner, conn) -> None:  # noqa: ANN001 - multiprocessing Connection
    while True:
        spans = conn.recv()
        if spans is None:
            return
        ctx, ids = runner.prepare_inputs(requests_of(spans))
        runner.model(ids, ctx)
