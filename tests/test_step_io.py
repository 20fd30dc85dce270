"""The scheduler <-> runner contract and the runner's logit rows, with exact expectations; one KV budget
split between the target and the draft model."""

import pytest
from conftest import TINY_KV_BYTES

from tuneserve.core.step_io import RunnerOutput, ScheduledRequest, scatter_output
from tuneserve.sampling_params import SamplingParams
from tuneserve.worker.kv_cache import token_bytes
from tuneserve.worker.logit_rows import LogitRows, RequestRows


def _sr(n, start, sample, prompt_len, drafts=0, prompt_logprobs=None):
    params = SamplingParams(prompt_logprobs=prompt_logprobs)
    return ScheduledRequest("r", list(range(n)), start, ([0],), params, sample, num_draft_tokens=drafts,
                            prompt_len=prompt_len)


def test_logit_rows_per_request():
    reqs = [
        _sr(5, 0, sample=False, prompt_len=12),  # a prompt chunk: no rows
        _sr(4, 8, sample=True, prompt_len=12, prompt_logprobs=1),  # last chunk: 3 prompt rows + 1 sampling row
        _sr(3, 20, sample=True, prompt_len=10, drafts=2),  # decode with 2 drafts: 3 sampling rows
        _sr(6, 0, sample=False, prompt_len=6, prompt_logprobs=0),  # whole prompt but one, no sampling yet
    ]
    plan = LogitRows.plan(reqs)
    # hidden rows: request 1 occupies 5..8, request 2 9..11, request 3 12..17
    assert plan.hidden_rows == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert plan.requests == [RequestRows(0, 0, 0), RequestRows(0, 3, 4), RequestRows(4, 4, 7),
                             RequestRows(7, 12, 12)]
    r1 = plan.requests[1]
    assert (r1.prompt, r1.sample, r1.num_prompt, r1.num_sample) == (slice(0, 3), slice(3, 4), 3, 1)
    assert plan.requests[2].local() == RequestRows(0, 0, 3)


def test_runner_output_checks_its_lengths():
    assert RunnerOutput([[1], []], [None, None], [None, None]).num_draft_tokens == [0, 0]
    with pytest.raises(ValueError, match="logprobs"):
        RunnerOutput([[1], []], [None], [None, None])
    with pytest.raises(ValueError, match="num_accepted"):
        RunnerOutput([[1]], [None], [None], [2], [])
    with pytest.raises(ValueError, match="outside"):
        RunnerOutput([[1]], [None], [None], errors={1: ValueError()})


def test_scatter_and_concat_keep_request_order():
    ran = RunnerOutput([[7], [8, 9]], [None, None], [None, None], [0, 1], [0, 1], errors={})
    err = ValueError("bad")
    full = scatter_output(ran, live=[0, 2], n=3, errors={1: err})
    assert full.sampled == [[7], [], [8, 9]] and full.num_accepted == [0, 0, 1] and full.errors == {1: err}
    both = RunnerOutput.concat([RunnerOutput.empty(1), ran], {0: err})
    assert both.sampled == [[], [7], [8, 9]] and both.errors == {0: err}
    with pytest.raises(ValueError):
        scatter_output(ran, live=[0], n=3, errors={})


def test_one_kv_budget_split_between_target_and_draft(make_llm, tiny_dirs):
    """The draft's KV comes out of kv_cache_memory_bytes, in proportion to its bytes per token, with its own
    dtype (a bf16 draft's blocks are half the size of fp32 ones)."""
    alone = make_llm().llm_engine
    spec = {"method": "draft", "model": str(tiny_dirs["llama-draft"]), "num_speculative_tokens": 2,
            "adaptive": False}
    for dtype in ("float32", "bfloat16"):
        engine = make_llm(speculative_config=spec, dtype=dtype).llm_engine
        target, draft = token_bytes(engine.config), token_bytes(engine.spec.draft.config)
        bs = engine.config.cache.block_size
        draft_blocks = engine.spec.draft.kv.pools[0].num_blocks
        assert draft_blocks == TINY_KV_BYTES * draft // (target + draft) // (draft * bs)
        target_blocks = engine.num_blocks[0]
        assert (target_blocks * target + draft_blocks * draft) * bs <= TINY_KV_BYTES
        if dtype == "float32":
            assert target_blocks < alone.num_blocks[0]
