"""Which rows of a step's hidden states get logits, and which of those rows belong to each request.

A request contributes prompt rows (when it asks for prompt logprobs: one per prompt position of the chunk
whose next token is still in the prompt) and sampling rows (when its chunk reaches the end of the known
tokens: its last 1 + num_draft_tokens positions, for verifying the drafts and drawing the bonus token).
Rows are contiguous per request, prompt rows first, in batch order.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneserve.core.step_io import ScheduledRequest


@dataclass(frozen=True)
class RequestRows:
    """One request's rows in the logits matrix: prompt rows [prompt_start, sample_start), sampling rows
    [sample_start, end)."""

    prompt_start: int
    sample_start: int
    end: int

    @property
    def prompt(self) -> slice:
        return slice(self.prompt_start, self.sample_start)

    @property
    def sample(self) -> slice:
        return slice(self.sample_start, self.end)

    @property
    def all(self) -> slice:
        return slice(self.prompt_start, self.end)

    @property
    def num_prompt(self) -> int:
        return self.sample_start - self.prompt_start

    @property
    def num_sample(self) -> int:
        return self.end - self.sample_start

    def local(self) -> RequestRows:
        """The same rows numbered from 0 (for the request's logits taken on their own)."""
        return RequestRows(0, self.num_prompt, self.end - self.prompt_start)


@dataclass(frozen=True)
class LogitRows:
    """The hidden rows that get logits, and each request's rows among them."""

    hidden_rows: list[int]
    requests: list[RequestRows]

    @classmethod
    def plan(cls, reqs: list[ScheduledRequest]) -> LogitRows:
        rows: list[int] = []
        spans: list[RequestRows] = []
        row = 0  # the request's first hidden row
        for r in reqs:
            start = len(rows)
            if r.params.prompt_logprobs is not None and r.start_pos < r.prompt_len - 1:
                rows.extend(range(row, row + min(r.num_tokens, r.prompt_len - 1 - r.start_pos)))
            sample_start = len(rows)
            if r.sample:
                rows.extend(range(row + r.num_tokens - 1 - r.num_draft_tokens, row + r.num_tokens))
            spans.append(RequestRows(start, sample_start, len(rows)))
            row += r.num_tokens
        return cls(rows, spans)
