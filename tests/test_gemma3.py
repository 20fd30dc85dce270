"""Gemma 3: greedy equality with HF transformers (a tiny random model and the packaged 270M), prefix
caching with mixed sliding / global KV groups, and the KV bytes a long request holds."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from conftest import assert_all_blocks_free, hf_greedy

from tuneserve import LLM, SamplingParams
from tuneserve.config import ArchConfig, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tuneserve.core.kv_layout import kv_groups
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request
from tuneserve.weights import open_checkpoint

KV = 1 << 22


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def random_prompts(lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(3, 259) for _ in range(n - 1)] for n in lengths]


def hf_model(path):  # noqa: ANN001, ANN201
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


# ----- tiny random Gemma 3 (window 32, layer 5 global) ------------------------------------------
def test_tiny_gemma3_config_and_kv_groups(tiny_dirs):
    arch = open_checkpoint(tiny_dirs["gemma3"]).arch_config()
    assert arch.layer_windows == (32, 32, 32, 32, 32, 0)
    assert (arch.rope_theta, arch.rope_theta_local, arch.query_pre_attn_scalar) == (1e6, 1e4, 24.0)
    groups = kv_groups(EngineConfig(ModelConfig("x", "x", arch), CacheConfig(), SchedulerConfig()))
    assert [(g.layers, g.window) for g in groups] == [((5,), 0), ((0, 1, 2, 3, 4), 32)]


@pytest.mark.parametrize("engine_kw", [{}, {"block_size": 4, "max_num_batched_tokens": 40}])
def test_tiny_gemma3_greedy_equals_hf(make_llm, tiny_dirs, engine_kw):
    """Prompts shorter and longer than the window, batched; small blocks and chunks cross the window."""
    prompts = random_prompts((10, 60, 150, 300))
    llm = make_llm("gemma3", kv_cache_memory_bytes=KV, **engine_kw)
    outs = llm.generate(prompts, greedy(24), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf_model(tiny_dirs["gemma3"]), prompts, 24)
    assert_all_blocks_free(llm)


def test_tiny_gemma3_prefix_caching_on_equals_off_with_partial_hits(make_llm):
    """The sliding group's pool is small (max_num_seqs=1), so a long prompt's early sliding blocks are
    evicted while its full-attention blocks stay cached: a hit then keeps only the in-window blocks."""
    base = random_prompts((201,), seed=1)[0]
    prompts = [base, base + [5, 6, 7] * 10, base[:150] + [9] * 40]
    kw = dict(kv_cache_memory_bytes=KV, block_size=4, max_num_batched_tokens=16, max_num_seqs=1)
    on = make_llm("gemma3", **kw)
    off = make_llm("gemma3", enable_prefix_caching=False, **kw)
    # sliding pool: 1 sequence x (ceil(31 / 4) + 2) + one 16-token step (4) + the null block; full: the rest
    assert [p.num_blocks for p in on.llm_engine.kv.pools] == [(KV - 15 * 5 * 1024) // 1024, 15]
    got_on, got_off, cached = [], [], []
    for p in prompts:  # one at a time, so each later prompt can hit the earlier ones' blocks
        o = on.generate([p], greedy(12), use_tqdm=False)[0]
        got_on.append(o.outputs[0].token_ids)
        cached.append(o.num_cached_tokens)
        got_off.append(off.generate([p], greedy(12), use_tqdm=False)[0].outputs[0].token_ids)
    assert got_on == got_off
    # 2nd: the first prompt's 50 full blocks hit (its sliding blocks 42-49, the window at 200, are still
    # cached; 0-41 were evicted). 3rd: the global layer still has the shared 37 blocks, but the sliding
    # layers lost blocks 29-36, so nothing can be reused
    assert cached == [0, 200, 0]
    assert_all_blocks_free(on)


# ----- KV bytes of a long request: Gemma 3 270M's layer pattern -------------------------------------
GEMMA3_270M = ArchConfig(
    architecture="gemma3", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_layers=18,
    num_heads=4, num_kv_heads=1, head_dim=256, rms_norm_eps=1e-6, rope_theta=1e6,
    max_position_embeddings=32768, tie_word_embeddings=True,
    layer_windows=tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18)), rope_theta_local=1e4,
    hidden_act="gelu_tanh", query_pre_attn_scalar=256.0, bos_token_id=2, eos_token_ids=(1,))


def test_gemma3_kv_bytes_at_8k_are_under_30_percent_of_full_attention():
    """An 8192-token prompt through the KV manager in 512-token chunks, then 100 decode steps; blocks
    held per group are counted while each step computes (the peak) and after it (what stays)."""
    groups = kv_groups(EngineConfig(ModelConfig("g", "g", GEMMA3_270M), CacheConfig(), SchedulerConfig()))
    assert [(len(g.layers), g.window) for g in groups] == [(3, 0), (15, 512)]
    kv = KVManager(groups, [600, 100], 16, max_step_tokens=512)
    req = Request("r", list(range(8192)), SamplingParams(max_tokens=100))

    def step(n: int) -> tuple[list[int], list[int]]:
        assert kv.allocate_slots(req, n)
        during = [kv.num_held_blocks(req, g) for g in range(2)]
        req.num_computed_tokens += n
        kv.cache_blocks(req)
        kv.remove_skipped_blocks(req)
        return during, [kv.num_held_blocks(req, g) for g in range(2)]

    def share(held: list[int]) -> float:  # KV bytes held / full attention on all 18 layers
        return (3 * held[0] + 15 * held[1]) / (18 * -(-req.num_computed_tokens // 16))

    peak = max(step(512)[0][1] for _ in range(16))
    after = [kv.num_held_blocks(req, g) for g in range(2)]
    assert after == [512, 32] and share(after) == 2016 / 9216  # 21.9% at 8k tokens
    assert peak == 64 <= kv.max_blocks_for(1, 8192)  # a chunk's 32 blocks + the 32 in its window
    assert (3 * 512 + 15 * peak) / 9216 <= 0.30  # 27.1% while the last chunk is computed
    for t in range(100):
        req.append_token(t, 0.0)
        during, after = step(1)
        assert during[1] <= 512 // 16 + 1 and after[1] <= 512 // 16 + 1
    assert share(after) <= 0.30
    kv.free(req)
    assert [p.num_free_blocks for p in kv.pools] == [599, 99]


# ----- the packaged Gemma 3 270M against HF transformers (fp32, same GGUF) ------------------------
@pytest.fixture(scope="module")
def gemma3():
    return LLM("gemma3-270m", max_model_len=2048, kv_cache_memory_bytes=256 << 20, quantization="none")


@pytest.mark.model
def test_gemma3_gguf_metadata_gives_the_layer_pattern():
    from tuneserve.weights.sources import pull

    arch = open_checkpoint(pull("gemma3-270m")).arch_config()
    assert dataclasses.replace(arch, rms_norm_eps=1e-6) == GEMMA3_270M


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_reference_tokens(gemma3):
    out = gemma3.generate(["The capital of France is"], greedy(12), use_tqdm=False)[0]
    assert out.prompt_token_ids == [2, 818, 5279, 529, 7001, 563]
    assert out.outputs[0].token_ids == [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488]


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_greedy_equals_hf_under_and_over_the_window(gemma3):
    """A short prompt and a ~900-token one (Wikipedia) in one batch; then the long one again from the
    prefix cache gives the same tokens."""
    from tuneserve.corpus import load_corpus, sample_prompts
    from tuneserve.weights.sources import pull

    tok = gemma3.get_tokenizer()
    long = [tok.bos_token_id] + sample_prompts(tok, load_corpus("wikipedia"), 1, 900, 900, seed=3)[0]
    prompts = [tok("The capital of France is").input_ids, long]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    outs = gemma3.generate(prompts, params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    assert got == hf_greedy(hf_model(pull("gemma3-270m")), prompts, 16)
    again = gemma3.generate([long], params, use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(long) - 1) // 16 * 16
    assert again.outputs[0].token_ids == got[1]
    assert_all_blocks_free(gemma3)
