"""Scheduler with a fake runner: token budgets, chunked prefill, preemption, priority, abort, admission."""

import pytest

from tuneserve.config import SchedulerConfig
from tuneserve.core.kv_layout import KVGroupSpec
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request, RequestStatus
from tuneserve.core.scheduler import Scheduler
from tuneserve.core.step_io import RunnerOutput
from tuneserve.sampling_params import SamplingParams

BS = 4


def make(num_blocks=64, budget=16, max_seqs=8, chunked=True, policy="fcfs", caching=True, max_len=256):
    kv = KVManager([KVGroupSpec((0,))], [num_blocks], BS, caching)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                          enable_chunked_prefill=chunked, policy=policy)
    return Scheduler(cfg, kv)


def req(rid, n_prompt, max_tokens=4, priority=0, start=0, **kw):
    return Request(rid, list(range(start, start + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   priority=priority)


def fake_token(seq):
    return (seq[-1] * 7 + 3) % 1000


def step(s):
    """Schedule, run a fake model, apply its output; the KV bookkeeping must hold after each half."""
    out = s.schedule()
    s.kv.check_invariants()
    sampled = [[fake_token(sr.token_ids)] if sr.sample else [] for sr in out.requests]
    s.update(out, RunnerOutput(sampled, [None] * len(sampled), [None] * len(sampled)))
    s.kv.check_invariants()
    return out


def run_all(s, reqs, max_steps=1000):
    for r in reqs:
        s.add_request(r)
    steps = []
    while s.has_unfinished():
        steps.append(step(s))
        assert len(steps) < max_steps, "livelock"
    return steps


def test_budget_chunks_prompts_and_mixes_decodes():
    s = make(budget=16)
    a, b, c = req("a", 10), req("b", 10, start=100), req("c", 10, start=200)
    for r in (a, b, c):
        s.add_request(r)
    out = step(s)
    assert [(x.req_id, x.num_tokens, x.sample) for x in out.requests] == [("a", 10, True), ("b", 6, False)]
    out = step(s)
    assert [(x.req_id, x.num_tokens, x.sample) for x in out.requests] == [
        ("a", 1, True), ("b", 4, True), ("c", 10, True)]
    assert out.num_batched_tokens == 15
    assert b.num_computed_tokens == 10 and b.num_output_tokens == 1


def test_chunked_prefill_off_waits_for_budget():
    s = make(budget=16, chunked=False)
    for r in (req("a", 10), req("b", 10)):
        s.add_request(r)
    out = step(s)
    assert [(x.req_id, x.num_tokens) for x in out.requests] == [("a", 10)]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        s.add_request(req("big", 17))


def test_max_num_seqs():
    s = make(budget=100, max_seqs=2)
    for i in range(3):
        s.add_request(req(str(i), 4))
    out = step(s)
    assert [x.req_id for x in out.requests] == ["0", "1"]
    assert s.num_waiting == 1


def test_outputs_and_stop_conditions():
    s = make()
    a = req("a", 3, max_tokens=5)
    e = Request("e", [1, 2, 3], SamplingParams(max_tokens=50), eos_token_ids=(fake_token([fake_token([3])]),))
    run_all(s, [a, e])
    assert a.num_output_tokens == 5 and a.status == RequestStatus.FINISHED_LENGTH
    assert e.num_output_tokens == 2 and e.status == RequestStatus.FINISHED_STOPPED
    assert s.kv.num_free_blocks() == 63


def test_stop_token_ids_and_ignore_eos():
    first = fake_token([2])
    s = make()
    a = Request("a", [1, 2], SamplingParams(max_tokens=5, stop_token_ids=[first]))
    b = Request("b", [1, 2], SamplingParams(max_tokens=5, ignore_eos=True), eos_token_ids=(first,))
    run_all(s, [a, b])
    assert a.output_token_ids == [first] and a.stop_reason == first
    assert b.num_output_tokens == 5


def outputs_of(reqs):
    return {r.request_id: r.output_token_ids for r in reqs}


def test_preemption_gives_the_same_tokens_and_frees_everything():
    mk = lambda: [req(str(i), 6, max_tokens=12, start=i * 10) for i in range(4)]
    ref_reqs = mk()
    run_all(make(num_blocks=64), ref_reqs)
    s = make(num_blocks=9)  # 8 usable blocks = 32 tokens; each request needs 18 tokens (5 blocks)
    reqs = mk()
    run_all(s, reqs)
    assert s.num_preemptions > 0
    assert outputs_of(reqs) == outputs_of(ref_reqs)
    pool = s.kv.pools[0]
    assert pool.num_free_blocks == pool.num_blocks - 1 and all(b.ref_cnt == 0 for b in pool.blocks[1:])


def test_preemption_takes_the_newest_first():
    s = make(num_blocks=7, budget=64)  # 6 usable blocks
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8, start=50)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a: 2 blocks + b: 2 blocks... both prompts of 8 fill 2 blocks each; decodes need more
    while b.num_preemptions == 0 and a.num_preemptions == 0:
        step(s)
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0


def test_priority_preempts_the_lowest_priority_even_if_older():
    s = make(num_blocks=7, budget=64, policy="priority")
    low, high = req("low", 8, max_tokens=8, priority=5), req("high", 8, max_tokens=8, priority=0, start=50)
    s.add_request(low)
    s.add_request(high)
    while low.num_preemptions == 0 and high.num_preemptions == 0:
        step(s)
    assert low.num_preemptions == 1 and high.num_preemptions == 0


def test_priority_orders_admission():
    s = make(budget=4, policy="priority")
    s.add_request(req("late", 4, priority=3))
    s.add_request(req("urgent", 4, priority=1))
    assert [x.req_id for x in step(s).requests] == ["urgent"]


def test_request_that_can_never_fit_is_rejected():
    s = make(num_blocks=5)  # 16 tokens
    with pytest.raises(ValueError, match="more than the whole KV cache"):
        s.add_request(req("a", 10, max_tokens=10))
    with pytest.raises(ValueError, match="max_model_len"):
        make(max_len=12).add_request(req("b", 10, max_tokens=5))


def test_abort_frees_blocks_at_once():
    s = make()
    a, b = req("a", 10), req("b", 10)
    s.add_request(a)
    s.add_request(b)
    step(s)
    s.abort(["a", "b"])
    s.kv.check_invariants()
    assert s.kv.num_free_blocks() == 63
    assert a.status == RequestStatus.FINISHED_ABORTED and not s.has_unfinished()
    assert s.schedule().finished_req_ids == {"a", "b"}


def test_prefix_hit_is_scheduled_from_the_hit():
    s = make(budget=64)
    run_all(s, [req("a", 12, max_tokens=1)])
    b = req("b", 14)
    s.add_request(b)
    out = step(s)
    assert out.requests[0].start_pos == 12 and out.requests[0].num_tokens == 2
    assert b.num_cached_tokens == 12
    assert (s.kv.prefix_queries, s.kv.prefix_hits) == (26, 12)


def test_sibling_waits_for_its_leader_then_shares_blocks():
    s = make(budget=64)
    lead = req("p#0", 10)
    sib = Request("p#1", list(range(10)), SamplingParams(max_tokens=4), leader_id="p#0")
    s.add_request(lead)
    s.add_request(sib)
    assert [x.req_id for x in step(s).requests] == ["p#0"]
    out = step(s)
    assert [x.req_id for x in out.requests] == ["p#0", "p#1"]
    assert s.kv.block_ids(sib)[0][:2] == s.kv.block_ids(lead)[0][:2]


def test_speculative_tokens_are_scheduled_and_rejected_ones_uncomputed():
    s = make(budget=64)
    a = req("a", 5, max_tokens=10)
    s.add_request(a)
    step(s)
    a.spec_token_ids = [11, 12, 13]
    out = s.schedule()
    sr = out.requests[0]
    assert sr.token_ids == [a.all_token_ids[-1], 11, 12, 13] and sr.num_draft_tokens == 3
    # accept 1 draft, then a bonus token: 2 new tokens, 2 computed (last token + 1 draft)
    s.update(out, RunnerOutput([[11, 77]], [None], [None], [3], [1]))
    s.kv.check_invariants()  # the rejected drafts' slots stay allocated, past the computed tokens
    assert a.output_token_ids[-2:] == [11, 77] and a.num_computed_tokens == 5 + 1 + 1
