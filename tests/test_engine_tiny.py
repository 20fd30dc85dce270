"""Engine on tiny random models: equality with HF transformers and the DESIGN.md invariants."""

import pytest
import torch
from conftest import assert_all_blocks_free, hf_greedy
from transformers import AutoModelForCausalLM

from tuneserve import SamplingParams

TEXTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "abc",
    "Paged attention keeps KV in fixed-size blocks so memory is never wasted on padding at all.",
    "x" * 40,
    "Continuous batching lets requests join and leave between steps.",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def token_ids(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_hf_in_a_mixed_batch(make_llm, tiny_dirs, arch):
    llm = make_llm(arch)
    tok = llm.get_tokenizer()
    prompts = [tok(t).input_ids for t in TEXTS]
    ours = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32).eval()
    assert ours == hf_greedy(hf, prompts, 24)
    assert_all_blocks_free(llm)


def test_logprobs_close_to_hf(make_llm, tiny_llama):
    llm = make_llm()
    tok = llm.get_tokenizer()
    prompts = [tok(t).input_ids for t in TEXTS[:3]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    for ids, o in zip(prompts, outs):
        full = ids + o.outputs[0].token_ids
        with torch.inference_mode():
            ref = hf(torch.tensor([full])).logits[0].log_softmax(-1)
        for j, lp in enumerate(o.outputs[0].logprobs):
            row = ref[len(ids) - 1 + j]
            assert lp.token_id == o.outputs[0].token_ids[j] and lp.rank == 1
            assert abs(lp.logprob - float(row[lp.token_id])) < 1e-4
            assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(ids)
        for j in range(1, len(ids)):
            p = o.prompt_logprobs[j]
            assert p.token_id == ids[j]
            assert abs(p.logprob - float(ref[j - 1, ids[j]])) < 1e-4
            assert p.rank == int((ref[j - 1] > ref[j - 1, ids[j]]).sum()) + 1
            assert len(p.top) == 3


def run(make_llm, prompts, params=GREEDY, **kw):
    llm = make_llm(**kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert_all_blocks_free(llm)
    return llm, token_ids(outs)


@pytest.fixture
def shared_prompts(make_llm):
    tok = make_llm().get_tokenizer()
    system = "You are a careful assistant. Answer briefly and exactly. " * 2
    return [tok(system + t).input_ids for t in TEXTS]


def test_prefix_caching_on_equals_off(make_llm, shared_prompts):
    llm_on, on = run(make_llm, shared_prompts + shared_prompts, enable_prefix_caching=True)
    _, off = run(make_llm, shared_prompts + shared_prompts, enable_prefix_caching=False)
    assert on == off
    kv = llm_on.llm_engine.kv
    assert kv.prefix_hits > 0 and kv.prefix_queries > kv.prefix_hits


def test_chunked_prefill_on_equals_off(make_llm, shared_prompts):
    _, chunked = run(make_llm, shared_prompts, max_num_batched_tokens=16)
    _, whole = run(make_llm, shared_prompts, enable_chunked_prefill=False)
    assert chunked == whole


def test_batch_equals_each_request_alone(make_llm, shared_prompts):
    _, batch = run(make_llm, shared_prompts)
    alone = [run(make_llm, [p], enable_prefix_caching=False)[1][0] for p in shared_prompts]
    assert batch == alone


def test_preemption_equals_no_preemption(make_llm, shared_prompts):
    llm, tight = run(make_llm, shared_prompts, kv_cache_memory_bytes=16 * 8192)  # 15 usable blocks
    assert llm.llm_engine.scheduler.num_preemptions > 0
    _, roomy = run(make_llm, shared_prompts)
    assert tight == roomy


def test_seeded_sampling_is_reproducible_across_batch_compositions(make_llm, shared_prompts):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    _, alone = run(make_llm, [shared_prompts[1]], p)
    other = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    llm = make_llm()
    outs = llm.generate(shared_prompts[:3], [other, p, other], use_tqdm=False)
    assert outs[1].outputs[0].token_ids == alone[0]
    _, different_seed = run(make_llm, [shared_prompts[1]],
                            SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True))
    assert different_seed != alone


def test_n_samples_share_the_prompt_blocks(make_llm, shared_prompts):
    llm = make_llm()
    eng = llm.llm_engine
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    eng.add_request("r", shared_prompts[0], p)
    tables = {}
    while eng.has_unfinished_requests():
        eng.step()
        for cid in ("r#0", "r#1", "r#2"):
            req = eng.requests.get(cid)
            if req is not None and req.num_output_tokens >= 2:
                tables[cid] = eng.kv.block_ids(req)[0]
        if len(tables) == 3:
            break
    full = len(shared_prompts[0]) // 16
    assert full >= 2
    assert tables["r#0"][:full] == tables["r#1"][:full] == tables["r#2"][:full]
    while eng.has_unfinished_requests():
        eng.step()
    outs = llm.generate([shared_prompts[0]], p, use_tqdm=False)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2] and len({tuple(o.token_ids) for o in outs}) > 1
    assert_all_blocks_free(llm)


def test_stop_strings_cut_the_text(make_llm):
    llm = make_llm()
    ref = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    stop = ref.text[5:7]
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    cut = ref.text.index(stop)
    assert out.text == ref.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert_all_blocks_free(llm)


def test_abort_frees_blocks(make_llm, shared_prompts):
    llm = make_llm()
    eng = llm.llm_engine
    for i, p in enumerate(shared_prompts):
        eng.add_request(str(i), p, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        eng.step()
    eng.abort_request([str(i) for i in range(len(shared_prompts))])
    assert_all_blocks_free(llm)
    outs = eng.step()
    assert {o.request_id for o in outs} == {str(i) for i in range(len(shared_prompts))}
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not eng.has_unfinished_requests()


def test_prompt_too_long_is_a_clear_error(make_llm):
    llm = make_llm(max_model_len=64)
    with pytest.raises(ValueError, match=r"context length is 64 tokens, but the prompt has 70 tokens and "
                                         r"max_tokens is 10"):
        llm.generate([[5] * 70], SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 272\)"):
        llm.generate([[5, 999]], SamplingParams(max_tokens=10), use_tqdm=False)
    assert_all_blocks_free(llm)


def test_max_tokens_defaults_to_the_rest_of_the_context(make_llm):
    llm = make_llm(max_model_len=40)
    out = llm.generate([[5] * 30], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"


def test_metrics_are_ordered(make_llm):
    out = make_llm().generate(["Hello there"], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.ttft > 0 and m.tpot > 0 and m.e2e >= m.ttft and m.queue_time >= 0
    assert m.num_generated_tokens == 5


def test_chat_uses_the_template(make_llm):
    llm = make_llm()
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, ignore_eos=True),
                   use_tqdm=False)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "<bos>user: hi\n<bos>assistant: "
