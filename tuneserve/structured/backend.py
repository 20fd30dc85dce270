"""The grammar backend interface: what the engine asks of any structured-output implementation."""

from __future__ import annotations

from typing import Protocol

import torch

from tuneserve.sampling_params import StructuredOutputsParams


class Matcher(Protocol):
    """One request's position in its grammar. Lives with the request (it follows it through preemption)
    and dies with it."""

    def accept(self, tokens: list[int]) -> bool:
        """Advance over sampled tokens; False (and the matcher in error) when one is not allowed."""

    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted (rejected drafts)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a bitmask from `allocate_bitmask`."""

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens` (drafts) the grammar takes in order from here; the matcher does not move."""

    def fill_bitmasks(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
        """Rows row .. row + len(drafts): the allowed next tokens here and after each prefix of `drafts`
        (which the grammar takes); the matcher ends where it started."""

    def is_terminated(self) -> bool:
        """Whether the grammar is complete and takes no token but EOS."""

    def error(self) -> str | None:
        """Why the matcher failed, or None."""


class GrammarBackend(Protocol):
    def compile(self, params: StructuredOutputsParams) -> object:
        """A compiled grammar (cached by its text); ValueError saying what is wrong or unsupported."""

    def matcher(self, compiled: object) -> Matcher:
        """A fresh matcher at the grammar's start."""

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A bitmask for `rows` logits rows (one bit per vocabulary entry)."""

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf, in place (row i of logits by row i of bitmask)."""
