"""Prompts as users give them (text, token ids, or a dict of either) into token ids, checked."""

from __future__ import annotations

from tuneserve.sampling_params import ParamError, utf8_error

PromptType = str | list[int] | dict


def tokenize_prompt(tokenizer, vocab_size: int, prompt: PromptType) -> tuple[str | None, list[int]]:  # noqa: ANN001
    """(text, token ids) of a prompt given as text, token ids or {"prompt" | "prompt_token_ids"}."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            prompt = list(prompt["prompt_token_ids"])
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ParamError("prompt", "a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        if (err := utf8_error(prompt)) is not None:  # the tokenizer would raise deep inside
            raise ParamError("prompt", f"prompt {err}")
        return prompt, tokenizer(prompt).input_ids
    if not isinstance(prompt, (list, tuple)):
        raise ParamError("prompt", f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ParamError("prompt", f"prompt token ids must be integers in [0, {vocab_size}), got {bad[:5]}")
    return None, ids
