"""The lab's replicas axis: a sweep point served by 2 replicas on a local Ray Serve, measured through HTTP,
its record counting both replicas' weights, KV cache and threads."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_KV_BYTES

pytest.importorskip("ray.serve")

import tuneserve.deploy.lab  # noqa: E402,F401 - adds the replicas session
from tuneserve.bench.sweep import parse_grid, run_sweep  # noqa: E402


@pytest.mark.slow  # a Ray cluster and three deployments: ~40 s
def test_sweep_serves_a_point_with_two_replicas(tiny_dirs, tmp_path):
    base = {"kv_cache_memory_bytes": TINY_KV_BYTES, "max_model_len": 1024}
    grid = parse_grid(["replicas=1,2", "threads=2"])
    threads = torch.get_num_threads()
    one, two = (r["metrics"] for r in run_sweep(str(tiny_dirs["llama"]), grid, "random", str(tmp_path / "r.jsonl"),
                                                 num_prompts=4, output_len=3, base=base, rates=[float("inf")],
                                                 mode="serve"))
    assert one["failed"] == two["failed"] == 0 and one["num_requests"] == two["num_requests"] == 4
    assert two["replicas"] == 2 and two["threads"] == 2 == one["threads"]  # 1 thread each
    assert two["weight_bytes"] == 2 * one["weight_bytes"] and two["kv_cache_bytes"] == 2 * TINY_KV_BYTES
    assert torch.get_num_threads() == threads


def test_replicas_are_a_serve_mode_axis(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="serve-mode axis"):
        run_sweep(str(tiny_dirs["llama"]), {"replicas": [2]}, "random", str(tmp_path / "r.jsonl"), 2, 2)
