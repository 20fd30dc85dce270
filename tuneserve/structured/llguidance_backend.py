"""The default grammar backend: llguidance (a light wheel; masks computed on the CPU, applied on any device).

Grammars are compiled once per text: the first request builds a matcher and checks it, later ones take a
deep copy of that prototype. JSON is generated without free whitespace (", " and ": " separators only), so
a model cannot run on in whitespace until max_tokens.
"""

from __future__ import annotations

import json
import threading

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from llguidance.gbnf_to_lark import any_to_lark

from tuneserve.sampling_params import StructuredOutputsParams

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
MAX_CACHED = 256  # compiled grammars kept (a prototype matcher each)


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for the request's constraint; ValueError for a constraint it cannot read."""
    if params.json is not None or params.json_object:
        schema = ANY_OBJECT if params.json_object else params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if params.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if params.choice is not None:  # a Lark alternation of string literals (JSON escapes are Lark's too)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        return llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    return llguidance.LLMatcher.grammar_from_lark(any_to_lark(params.grammar))


class LLGuidanceMatcher:
    """backend.Matcher over an llguidance LLMatcher. EOS is never consumed here: llguidance does not count
    it in the history that rollback undoes, and nothing follows it."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: tuple[int, ...]) -> None:
        self._m = matcher
        self._eos = frozenset(eos_token_ids)

    def accept(self, tokens: list[int]) -> bool:
        return all(self._m.consume_token(t) for t in tokens)

    def rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)

    def valid_prefix(self, tokens: list[int]) -> int:
        eos = next((i for i, t in enumerate(tokens) if t in self._eos), None)
        if eos is not None:  # an EOS ends the drafts: it fits where the grammar may end
            n = self._m.validate_tokens(tokens[:eos])
            return n + 1 if n == eos and self._m.validate_tokens(tokens[:eos + 1]) == eos + 1 else n
        return self._m.validate_tokens(tokens)

    def fill_bitmasks(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
        taken = 0
        for j, tok in enumerate([*drafts, None]):
            llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row + j)
            if tok is None:
                break
            if tok in self._eos:  # the request ends at this draft if it is accepted: later rows allow all
                bitmask[row + j + 1:row + len(drafts) + 1] = -1
                break
            if not self._m.consume_token(tok):
                raise RuntimeError(f"draft token {tok} does not fit the grammar: {self._m.get_error()}")
            taken += 1
        self._m.rollback(taken)

    def is_terminated(self) -> bool:
        return self._m.is_stopped()

    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


class LLGuidanceBackend:
    """backend.GrammarBackend for one tokenizer and vocabulary (the logits' width)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:  # noqa: ANN001
        self.vocab_size, self.eos_token_ids = vocab_size, tuple(eos_token_ids)
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(eos_token_ids) or None)
        self._compiled: dict[str, llguidance.LLMatcher] = {}
        self._lock = threading.Lock()  # requests are prepared on several threads
        # the first apply builds llguidance's kernel (seconds): pay it here, not in a step
        self.apply_bitmask(torch.zeros(1, vocab_size), self.allocate_bitmask(1))

    def compile(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        try:
            text = grammar_text(params)
        except Exception as e:  # noqa: BLE001 - the user's grammar or schema: every failure is theirs to fix
            raise ValueError(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)) from None
        with self._lock:
            cached = self._compiled.get(text)
        if cached is not None:
            return cached
        error = llguidance.LLMatcher.validate_grammar(text, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise ValueError(error.strip())
        prototype = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        if prototype.is_error():
            raise ValueError(prototype.get_error())
        with self._lock:
            if len(self._compiled) >= MAX_CACHED:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[text] = prototype
        return prototype

    def matcher(self, compiled: llguidance.LLMatcher) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(compiled.deep_copy(), self.eos_token_ids)

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return llguidance.torch.allocate_token_bitmask(rows, self.vocab_size)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
