"""OutputProcessor: per user request, detokenize new tokens, catch stop strings, build RequestOutputs.

A user request with n > 1 fans out into n scheduler requests ("children"); this class gathers them
back into one RequestOutput.

Appending a step's tokens costs time in the new tokens only: text is kept as a list of pieces, the
cumulative logprob as a running sum. What a step reports depends on the request's output kind:
  cumulative  everything so far, every step (a copy of the output: the convenience mode of engine.step)
  delta       only what is new since the last report (the server's streams)
  final       nothing until the request finishes, then everything once (LLM.generate, non-streaming)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneserve.core.request import FINISH_REASONS, Request
from tuneserve.errors import RequestError
from tuneserve.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from tuneserve.tokenizer import IncrementalDetokenizer

OUTPUT_KINDS = ("cumulative", "delta", "final")


@dataclass
class ChildState:
    index: int
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    req: Request | None = None
    sent_tokens: int = 0  # delta kind: tokens and text pieces already reported
    sent_parts: int = 0

    def add_text(self, piece: str) -> None:
        if piece:
            self.text_parts.append(piece)


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, ChildState]
    arrival_time: float
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    metadata: dict = field(default_factory=dict)
    output_kind: str = "cumulative"
    error: RequestError | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children.values())


class OutputProcessor:
    """Turns scheduler progress into RequestOutputs; reports stop-string hits back to the engine."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001 - any HF tokenizer
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add(self, parent: ParentState, child_reqs: list[Request]) -> None:
        if parent.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {OUTPUT_KINDS}, got {parent.output_kind!r}")
        self.parents[parent.request_id] = parent
        for i, req in enumerate(child_reqs):
            p = req.params
            detok = None
            if p.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.stop_strings,
                                               p.skip_special_tokens, p.include_stop_str_in_output)
            parent.children[req.request_id] = ChildState(i, detok, logprobs=[] if p.logprobs is not None else None,
                                                         req=req)
            self.child_to_parent[req.request_id] = parent.request_id
        if child_reqs[0].params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]

    def on_tokens(self, req: Request, new_tokens: list[int], logprobs: list[TokenLogprobs] | None) -> bool:
        """Record a child's new tokens; returns True when a stop string ended it."""
        parent = self.parents[self.child_to_parent[req.request_id]]
        c = parent.children[req.request_id]
        new_tokens = new_tokens[: max(0, req.num_output_tokens - len(c.token_ids))]
        c.token_ids.extend(new_tokens)
        if c.logprobs is not None and logprobs:
            kept = logprobs[: len(new_tokens)]
            c.logprobs.extend(kept)
            c.cumulative_logprob += sum(t.logprob for t in kept)
        if c.detok is not None:
            c.add_text(c.detok.add(new_tokens))
            if c.detok.stopped is not None:
                c.finish_reason, c.stop_reason = "stop", c.detok.stopped
                return True
        return False

    def on_prompt_logprobs(self, req: Request, lps: list[TokenLogprobs]) -> None:
        parent = self.parents[self.child_to_parent[req.request_id]]
        if parent.prompt_logprobs is not None and len(parent.prompt_logprobs) < len(parent.prompt_token_ids):
            room = len(parent.prompt_token_ids) - len(parent.prompt_logprobs)
            parent.prompt_logprobs.extend(lps[:room])

    def on_finished(self, req: Request) -> None:
        parent = self.parents.get(self.child_to_parent.get(req.request_id, ""))
        if parent is None:
            return
        c = parent.children[req.request_id]
        if c.finish_reason is None:
            c.finish_reason = FINISH_REASONS[req.status]
            c.stop_reason = req.stop_reason
        if c.detok is not None:
            c.add_text(c.detok.flush())

    def fail(self, parent_id: str, error: RequestError) -> None:
        """Mark a user request as failed: its output says finish_reason "error" and carries the error."""
        parent = self.parents.get(parent_id)
        if parent is not None and parent.error is None:
            parent.error = error

    def output(self, parent_id: str) -> RequestOutput | None:
        """What the request reports now under its output kind (None: nothing to report yet)."""
        p = self.parents[parent_id]
        finished = p.finished
        if p.output_kind == "final" and not finished:
            return None
        delta = p.output_kind == "delta"
        outs = [self._completion(c, delta, p.error) for c in sorted(p.children.values(), key=lambda c: c.index)]
        metrics = self._metrics(p)
        return RequestOutput(parent_id, p.prompt, p.prompt_token_ids, outs, finished, metrics,
                             p.prompt_logprobs, metrics.num_cached_tokens, dict(p.metadata), p.error)

    @staticmethod
    def _completion(c: ChildState, delta: bool, error: RequestError | None) -> CompletionOutput:
        t0, k0 = (c.sent_parts, c.sent_tokens) if delta else (0, 0)
        text = "".join(c.text_parts[t0:])
        if delta:
            c.sent_parts, c.sent_tokens = len(c.text_parts), len(c.token_ids)
        reason = "error" if error is not None and c.finish_reason is not None else c.finish_reason
        return CompletionOutput(c.index, text, c.token_ids[k0:], reason, c.stop_reason,
                                c.logprobs[k0:] if c.logprobs is not None else None,
                                c.cumulative_logprob if c.logprobs else None)

    @staticmethod
    def _metrics(p: ParentState) -> RequestMetrics:
        """Timings of the first sample (n > 1 samples run side by side); finish = the last one's."""
        reqs = [c.req for c in sorted(p.children.values(), key=lambda c: c.index)]
        first = reqs[0]
        m = RequestMetrics(arrival_time=p.arrival_time, num_prompt_tokens=len(p.prompt_token_ids),
                           first_scheduled_time=first.first_scheduled_time, first_token_time=first.first_token_time,
                           last_token_time=first.token_times[-1] if first.token_times else None,
                           num_generated_tokens=first.num_output_tokens,
                           num_cached_tokens=max(0, first.num_cached_tokens),
                           num_preemptions=sum(r.num_preemptions for r in reqs),
                           spec_num_drafts=sum(r.spec_num_drafts for r in reqs),
                           spec_num_draft_tokens=sum(r.spec_num_draft_tokens for r in reqs),
                           spec_num_accepted_tokens=sum(r.spec_num_accepted_tokens for r in reqs),
                           spec_accepted_per_pos=list(first.spec_accepted_per_pos))
        if p.finished:
            m.finished_time = max((r.finished_time for r in reqs if r.finished_time is not None), default=None)
            t = first.token_times
            m.inter_token_latencies = [b - a for a, b in zip(t, t[1:])]
        return m

    def pop(self, parent_id: str) -> None:
        p = self.parents.pop(parent_id, None)
        if p is not None:
            for cid in p.children:
                self.child_to_parent.pop(cid, None)

    def num_tokens(self, child_id: str) -> int:
        """Tokens a child's output holds so far."""
        return len(self.parents[self.child_to_parent[child_id]].children[child_id].token_ids)

    def parent_of(self, child_id: str) -> str | None:
        return self.child_to_parent.get(child_id)
