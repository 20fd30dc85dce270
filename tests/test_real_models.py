"""Greedy equality with HF transformers on the packaged GGUF models (same weights, fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_all_blocks_free, hf_greedy

from tuneserve import LLM, SamplingParams
from tuneserve.weights.sources import pull

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old woodcutter who "
    "had three sons. The eldest was strong, the second was clever, and the youngest",
    "List three primary colors:",
    "Water boils at",
]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def check_against_hf(alias: str, max_new: int, min_agree_logprob_top5: bool = True) -> None:
    path = pull(alias)
    llm = LLM(alias, max_model_len=1024, kv_cache_memory_bytes=256 << 20)
    tok = llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    ref = hf_greedy(hf_model(path), prompts, max_new)
    assert [o.outputs[0].token_ids for o in outs] == ref
    for o in outs:  # where rounding differs, the chosen token must still be in the top-5
        assert all(lp.rank <= 5 for lp in o.outputs[0].logprobs)
    assert_all_blocks_free(llm)


@pytest.mark.model
def test_smollm2_reference_tokens():
    llm = LLM("smollm2-135m", max_model_len=256, kv_cache_memory_bytes=64 << 20)
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=12),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == [504, 3575, 282, 4649, 314]
    assert out.outputs[0].token_ids == [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33]
    assert out.outputs[0].text == " Paris.\n\nThe answer is: 201"


@pytest.mark.model
def test_smollm2_greedy_equals_hf_in_a_mixed_batch():
    check_against_hf("smollm2-135m", 24)


@pytest.mark.model
@pytest.mark.slow
def test_qwen_coder_05b_greedy_equals_hf_in_a_mixed_batch():
    check_against_hf("qwen2.5-coder-0.5b", 16)
