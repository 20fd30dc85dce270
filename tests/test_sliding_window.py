"""Sliding-window KV: block bounds while decoding, prefix hits with mixed groups, memory split per group,
and a window wider than the context changing nothing."""

from __future__ import annotations

import random

import pytest
from conftest import assert_all_blocks_free
from test_kv_manager import compute  # allocate, then pretend the runner computed n tokens

from tuneserve import SamplingParams
from tuneserve.core.block_pool import NULL_BLOCK_ID
from tuneserve.core.kv_layout import KVGroupSpec, kv_groups, split_kv_blocks
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request

BS = 4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def mixed_kv(window_blocks: int, sinks: int = 0) -> KVManager:
    """Layer 0 full attention (19 usable blocks), layer 1 a window of 8 tokens (window_blocks usable)."""
    return KVManager([KVGroupSpec((0,)), KVGroupSpec((1,), 8, sinks)], [20, window_blocks + 1], BS)


# ----- prefix hits with a windowed group ----------------------------------------------------------
def test_hit_keeps_only_the_windowed_blocks_in_reach():
    kv = mixed_kv(5)
    a = Request("a", list(range(17)), greedy(1))
    compute(kv, a, 17)  # window pool: blocks 1-5; after the step 1, 2 (tokens 0-7) fall out of the window
    assert kv.block_ids(a) == ([1, 2, 3, 4, 5], [0, 0, 3, 4, 5])
    kv.free(a)
    compute(kv, Request("x", list(range(100, 108)), greedy(1)), 8)  # evicts window blocks 2, 1
    c = Request("c", list(range(16)) + [99, 98], greedy(1))
    hits, n = kv.get_computed_blocks(c)
    # resuming at 16, the window group needs tokens 9-15 (blocks 2, 3 of the request): still cached
    assert n == 16
    assert [[b.block_id for b in g] for g in hits] == [[1, 2, 3, 4], [NULL_BLOCK_ID, NULL_BLOCK_ID, 3, 4]]
    compute(kv, c, 2, hits)
    assert kv.block_ids(c) == ([1, 2, 3, 4, 8], [0, 0, 3, 4, 5])
    assert kv.pools[1].blocks[NULL_BLOCK_ID].ref_cnt == 1


def test_no_hit_when_a_sink_block_was_evicted():
    kv = mixed_kv(5, sinks=2)
    a = Request("a", list(range(17)), greedy(1))
    compute(kv, a, 17)
    assert kv.block_ids(a) == ([1, 2, 3, 4, 5], [1, 0, 3, 4, 5])  # block 1 holds the sinks
    kv.free(a)
    kv.pools[1]._evict(kv.pools[1].blocks[1])  # the sink block is freed last, so evicted last: force it
    hits, n = kv.get_computed_blocks(Request("c", list(range(16)) + [99, 98], greedy(1)))
    assert n == 0 and hits == [[], []]


def test_full_group_bounds_the_hit():
    kv = mixed_kv(10)
    compute(kv, Request("a", list(range(17)), greedy(1)), 17)
    hits, n = kv.get_computed_blocks(Request("c", list(range(8)) + [7] * 10, greedy(1)))
    assert n == 8 and [[b.block_id for b in g] for g in hits] == [[1, 2], [1, 2]]


@pytest.mark.parametrize("window,sinks,chunk", [(8, 0, 1), (8, 0, 5), (7, 0, 16), (13, 2, 3), (8, 4, 11)])
def test_blocks_held_never_exceed_the_bound(window, sinks, chunk):
    """Random chunk sizes up to `chunk`: while a chunk is computed the window group holds at most
    max_blocks_for blocks, and after each step at most ceil((window - 1) / bs) + 1 + sink blocks."""
    kv = KVManager([KVGroupSpec((0,), window, sinks)], [200], BS, max_step_tokens=chunk)
    rng = random.Random(window * 100 + chunk)
    r = Request("a", list(range(300)), greedy(1))
    bound = kv.max_blocks_for(0, 300)
    seen = 0
    while r.num_computed_tokens < 300:
        n = min(rng.randint(1, chunk), 300 - r.num_computed_tokens)
        assert kv.allocate_slots(r, n)
        seen = max(seen, kv.num_held_blocks(r))
        assert kv.num_held_blocks(r) <= bound
        r.num_computed_tokens += n
        kv.remove_skipped_blocks(r)
        kv.check_invariants()
        assert kv.num_held_blocks(r) <= -(-(window - 1) // BS) + 1 + -(-sinks // BS)
    assert seen >= bound - 2  # the bound is nearly tight


@pytest.mark.parametrize("tokens,step,fits", [(76, 8, True), (77, 8, False), (76, 16, False), (7, 16, True)])
def test_can_ever_fit_counts_a_step_in_the_window_group(tokens, step, fits):
    """Full group: 19 usable blocks = 76 tokens. Window group (8 tokens, 5 usable blocks): a step of L new
    tokens needs ceil((L + 7) / 4) + 1 blocks at once: 5 for L = 8, 7 for L = 16."""
    kv = KVManager([KVGroupSpec((0,)), KVGroupSpec((1,), 8)], [20, 6], BS, max_step_tokens=step)
    assert kv.can_ever_fit(tokens) is fits


# ----- memory split -------------------------------------------------------------------------------
GEMMA_GROUPS = [KVGroupSpec((5, 11, 17)), KVGroupSpec(tuple(i for i in range(18) if (i + 1) % 6), 512)]
GEMMA_BLOCK_BYTES = [3 * 32768, 15 * 32768]  # 16 tokens x K, V x 256 fp32 per layer


def test_window_group_gets_only_what_running_requests_can_hold():
    counts = split_kv_blocks(GEMMA_GROUPS, GEMMA_BLOCK_BYTES, 1 << 30, 16, max_num_seqs=4,
                             max_step_tokens=512)
    window = 4 * (32 + 2) + 32 + 1  # per sequence ceil(511 / 16) + 2, one 512-token step, the null block
    assert counts == [((1 << 30) - window * 15 * 32768) // (3 * 32768), window] == [10077, 169]
    assert sum(n * b for n, b in zip(counts, GEMMA_BLOCK_BYTES)) <= 1 << 30


def test_short_memory_splits_evenly_and_window_only_models_share():
    assert split_kv_blocks(GEMMA_GROUPS, GEMMA_BLOCK_BYTES, 64 << 20, 16, 64, 512) == [113, 113]
    only = [KVGroupSpec((0, 1), 64, 4)]
    assert split_kv_blocks(only, [1000], 100_000, 16, 1, 16) == [100]


# ----- the engine ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,engine_kw,sink_blocks", [
    ("gemma3", {}, 0),  # native: layers 0-4 slide over 32 tokens
    ("llama", {"sliding_window": 32}, 1),  # imposed on every layer, with 4 sink tokens
])
def test_sliding_layer_blocks_stay_within_the_window_while_decoding(make_llm, arch, engine_kw, sink_blocks):
    llm = make_llm(arch, block_size=BS, max_num_batched_tokens=32, **engine_kw)
    eng = llm.llm_engine
    g = next(i for i, spec in enumerate(eng.groups) if spec.window)
    eng.add_request("r", [0] + [random.Random(0).randrange(3, 259) for _ in range(99)], greedy(150))
    req = eng.requests["r"]
    held = []
    while eng.has_unfinished_requests():
        eng.step()
        if not req.is_finished:
            held.append(eng.kv.num_held_blocks(req, g))
            if eng.groups[0].window == 0:  # a full group keeps every block
                assert eng.kv.num_held_blocks(req, 0) == -(-req.num_computed_tokens // BS)
    decode = held[4:]  # after the prompt's 4 steps (the 4th samples token 1): tokens 2-149 (150 ends it)
    assert len(decode) == 148
    assert max(decode) == 32 // BS + 1 + sink_blocks
    assert_all_blocks_free(llm)


def test_a_window_wider_than_the_context_changes_nothing(make_llm):
    rng = random.Random(1)
    prompts = [[0] + [rng.randrange(3, 259) for _ in range(n)] for n in (20, 90, 150)]
    base = make_llm().generate(prompts, greedy(40), use_tqdm=False)
    wide_llm = make_llm(sliding_window=256, block_size=BS)
    wide = wide_llm.generate(prompts, greedy(40), use_tqdm=False)
    narrow = make_llm(sliding_window=16).generate(prompts, greedy(40), use_tqdm=False)
    ids = [[o.outputs[0].token_ids for o in outs] for outs in (base, wide, narrow)]
    assert ids[0] == ids[1]
    assert ids[2] != ids[0]  # a window the context does pass changes the output: the window is applied
    assert_all_blocks_free(wide_llm)


# ----- overflow policies, through the server --------------------------------------------------------
def test_server_reports_truncation_in_usage(tiny_dirs):
    import httpx
    from server_utils import LiveServer

    from tuneserve.engine_args import EngineArgs

    args = EngineArgs(model=str(tiny_dirs["llama"]), kv_cache_memory_bytes=1 << 21, max_model_len=64,
                      overflow_policy="truncate-middle")
    server = LiveServer(args)
    try:
        body = {"model": str(tiny_dirs["llama"]), "prompt": "y" * 100, "max_tokens": 10, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == 54  # 64 - 10: head 27 + tail 27 of the 100 byte tokens
        assert usage["tuneserve"] == {"overflow_policy": "truncate-middle", "original_prompt_tokens": 100,
                                      "removed_tokens": 46, "prompt_tokens": 54, "removed_range": [27, 73]}
    finally:
        server.stop()


# ----- bench context --------------------------------------------------------------------------------
def test_cost_fit_recovers_a_quadratic():
    from tuneserve.bench.context import fit_cost

    ns = [512, 1024, 2048, 4096, 8192]
    fit = fit_cost(ns, [1e-3 * n + 1e-7 * n * n for n in ns])
    assert fit["a"] == pytest.approx(1e-3) and fit["b"] == pytest.approx(1e-7)
    assert fit["crossover_n"] == pytest.approx(10_000)
    assert fit["fit_ratio_32k_8k"] == pytest.approx((32.768 + 107.374) / (8.192 + 6.711), rel=1e-4)
    assert fit_cost(ns, [2e-3 * n for n in ns])["crossover_n"] is None  # linear: never quadratic


def test_bench_context_runs_and_writes_json_and_png(tiny_dirs, tmp_path):
    import argparse
    import json

    from tuneserve.bench import context

    p = argparse.ArgumentParser()
    context.add_parser(p.add_subparsers())
    ns = p.parse_args(["context", str(tiny_dirs["gemma3"]), "--lengths", "48,96", "--decode-tokens", "4",
                       "--sliding-window", "40", "--out", str(tmp_path), "--results", str(tmp_path / "r.jsonl")])
    assert ns.bench_main(ns) == 0
    data = json.loads((tmp_path / "context.json").read_text())
    rows = {(r["mode"], r["context"]): r for r in data["results"]}
    assert set(rows) == {(m, n) for m in ("native", "full", "window 40") for n in (48, 96)}
    assert rows[("full", 96)]["kv_ratio"] == 1.0
    # native at 99 tokens: the global layer's 7 blocks + 5 sliding layers x 3 blocks (48 < 99 - 31)
    assert rows[("native", 96)]["kv_ratio"] == (7 + 5 * 3) / (6 * 7)
    assert (tmp_path / "context.png").stat().st_size > 10_000
    from tuneserve.bench.records import load_records
    from tuneserve.bench.report import context_rows

    table3 = context_rows(load_records(tmp_path / "r.jsonl"))  # the report's context table reads them back
    assert [(r["attention"], r["context"]) for r in table3] == sorted(rows)
    assert table3[0]["prefill_s"] == rows[sorted(rows)[0]]["prefill_s"]


def test_an_imposed_window_leaves_native_windows_without_sinks():
    from dataclasses import replace

    from tuneserve.config import ArchConfig, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    arch = ArchConfig("gemma3", 10, 8, 8, 6, 1, 1, 8, 1e-6, 1e6, 64, True, layer_windows=(32,) * 5 + (0,))
    config = EngineConfig(ModelConfig("m", "m", arch), CacheConfig(sliding_window=32), SchedulerConfig())
    assert kv_groups(config) == [KVGroupSpec((0, 1, 2, 3, 4), 32, 0), KVGroupSpec((5,), 32, 4)]
    native = [KVGroupSpec((5,)), KVGroupSpec((0, 1, 2, 3, 4), 32)]
    assert kv_groups(replace(config, cache=CacheConfig())) == native
