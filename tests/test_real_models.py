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


LOGPROB_TOL = 1e-3  # nats: both sides fp32 on the same weights; batching and KV paging only reorder sums


def hf_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """HF's log-softmax of each output token at its position: one fp32 forward over prompt + output."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]  # (len(output), V)
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp[torch.arange(len(output)), torch.tensor(output)].tolist()


def check_against_hf(alias: str, max_new: int) -> None:
    path = pull(alias)
    llm = LLM(alias, max_model_len=1024, kv_cache_memory_bytes=256 << 20, quantization="none")  # fp32, as HF
    tok = llm.get_tokenizer()
    prompts = [tok(p).input_ids for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=5)
    outs = llm.generate(prompts, params, use_tqdm=False)
    hf = hf_model(path)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(hf, prompts, max_new)
    for prompt, o in zip(prompts, outs):  # the chosen tokens' logprobs, against HF's at the same positions
        ours = [lp.logprob for lp in o.outputs[0].logprobs]
        assert ours == pytest.approx(hf_logprobs(hf, prompt, o.outputs[0].token_ids), abs=LOGPROB_TOL)
    assert_all_blocks_free(llm)


@pytest.mark.model
def test_smollm2_reference_tokens():
    llm = LLM("smollm2-135m", max_model_len=256, kv_cache_memory_bytes=64 << 20, quantization="none")
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
