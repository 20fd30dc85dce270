"""Shared fixtures: tiny random models (built once per session), engines on them, HF references."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TUNESERVE_QUIET", "1")
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny, build_tiny_gemma3  # noqa: E402

from tuneserve import LLM  # noqa: E402

TINY_KV_BYTES = 256 * 8192  # 256 blocks of 16 tokens for the tiny models (512 bytes per token)


def packed_weights(n: int, k: int, bits: int, seed: int = 0, group: int = 32):
    """Random (qweight, scales, mins) in the kernels' q4 / q8 formats (kernels/quant_ops.py), fp16 scales; mins
    None for q8."""
    import torch

    from tuneserve.kernels import quant_ops

    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        qw = quant_ops.pack_int4(torch.randint(0, 16, (n, k), generator=g))
        scales, mins = torch.rand(n, k // group, generator=g) * 0.02, -torch.rand(n, k // group, generator=g) * 0.1
        return qw, scales.half(), mins.half()
    qw = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    return qw, (torch.rand(n, k // group, generator=g) * 0.002).half(), None


@pytest.fixture(autouse=True)
def _kv_invariants_after_every_step(monkeypatch):
    """Every engine step of every test leaves the KV bookkeeping consistent, the draft model's included."""
    from tuneserve.engine.llm_engine import LLMEngine

    original = LLMEngine.step

    @functools.wraps(original)
    def step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self.kv.check_invariants()
        draft = getattr(getattr(self, "spec", None), "draft", None)
        if draft is not None:
            draft.kv.check_invariants()
        return out

    monkeypatch.setattr(LLMEngine, "step", step)


@pytest.fixture
def vnni_bf16_cpu(monkeypatch):
    """Pretend this CPU has AVX-512 VNNI and AMX-BF16, so every activation mode is runnable (the choices
    resolve as there; no kernel is called through the stand-in library), with no kernel variables set."""
    from tuneserve.kernels import libraries, quant_ops
    from tuneserve.kernels.config import ENV_KERNELS, ENV_QUANT_ACT, ENV_TILE_GEMM, CpuFeatures

    if not quant_ops.compiled_available():
        pytest.skip("no C compiler here")
    for name in (ENV_KERNELS, ENV_QUANT_ACT, ENV_TILE_GEMM):
        monkeypatch.delenv(name, raising=False)
    cpu = CpuFeatures(avx2=True, avx512=True, avx512_vnni=True, amx_bf16=True)
    monkeypatch.setattr(CpuFeatures, "detect", staticmethod(lambda: cpu))
    monkeypatch.setattr(libraries, "qmatmul_vnni", lambda: object())


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {arch: build_tiny(root / arch, arch) for arch in ("llama", "qwen2")}
    # a draft for the tiny llama: the same tokenizer and seed, weights scaled by 0.8, so its guesses are
    # right about a third of the time
    dirs["llama-draft"] = build_tiny(root / "llama-draft", "llama", seed=0, std=0.2)
    dirs["gemma3"] = build_tiny_gemma3(root / "gemma3")  # layers 0-4 slide over 32 tokens, layer 5 global
    return dirs


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture
def make_llm(tiny_dirs):
    """make_llm(arch="llama", **engine_args) -> LLM on a tiny model."""

    def make(arch: str = "llama", **kw) -> LLM:
        kw.setdefault("kv_cache_memory_bytes", TINY_KV_BYTES)
        return LLM(str(tiny_dirs[arch]), **kw)

    return make


def hf_greedy(model, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy continuations from an HF model, one prompt at a time, EOS ignored."""
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model(x, use_cache=True)
            toks = []
            for _ in range(max_new):
                t = int(out.logits[0, -1].argmax())
                toks.append(t)
                out = model(torch.tensor([[t]]), use_cache=True, **{cache_kw: out.past_key_values})
            outs.append(toks)
    return outs


def assert_all_blocks_free(llm: LLM) -> None:
    """Invariant: no request holds a block; in every KV group every block is free (possibly cached) with
    ref count 0, and the null block keeps its single pin."""
    kv = llm.llm_engine.kv
    for pool in kv.pools:
        assert pool.num_free_blocks == pool.num_blocks - 1
        assert all(b.ref_cnt == 0 for b in pool.blocks[1:])
        assert pool.blocks[0].ref_cnt == 1
    assert all(not d for d in kv.req_blocks)


