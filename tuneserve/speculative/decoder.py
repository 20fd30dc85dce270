"""SpecDecoder: each step, proposes draft tokens for the running requests (n-gram lookup or a draft
model), with a length chosen by the adaptive controller; learns acceptance and cost from the results.

Drafts become extra tokens of their request in the next step's token budget and are verified in the
same target forward pass as everything else (worker/model_runner.py, sample/rejection.py).
"""

from __future__ import annotations

import time

import torch

from tuneserve.config import SpecConfig
from tuneserve.core.request import Request, RequestStatus
from tuneserve.core.step_io import RunnerOutput, SchedulerOutput
from tuneserve.speculative.adaptive import KController
from tuneserve.speculative.draft import DraftProposer
from tuneserve.speculative.ngram import propose_ngram
from tuneserve.worker.model_runner import ModelRunner


class SpecDecoder:
    """Drafts for the next step: n-gram lookup, or a draft model when `draft` is given (method "draft")."""

    def __init__(self, spec: SpecConfig, max_model_len: int, runner: ModelRunner,
                 draft: DraftProposer | None = None) -> None:
        self.spec = spec
        self.max_model_len = max_model_len
        self.ctl = KController(spec.num_speculative_tokens, spec.adaptive)
        self.draft = draft
        if spec.adaptive:
            self.calibrate(runner)

    def calibrate(self, runner: ModelRunner) -> None:
        """Seed the target's step-time table with a few timed forwards of 1..256 tokens."""
        for n in (1, 4, 16, 64, 256):
            runner.time_forward(n)  # warm
            self.ctl.target.observe(n, runner.time_forward(n), seed=True)

    # ----- each step --------------------------------------------------------------------------
    def observe(self, sched: SchedulerOutput, out: RunnerOutput, seconds: float) -> None:
        """Learn from a finished step: its cost, and how many drafts were accepted where."""
        self.ctl.target.observe(sched.num_batched_tokens, seconds)
        for drafted, accepted in zip(out.num_draft_tokens, out.num_accepted):
            if drafted:
                self.ctl.stats.record(drafted, accepted)

    def propose(self, running: list[Request]) -> None:
        """Set spec_token_ids (and draft distributions) on running requests that are decoding."""
        live = [r for r in running if r.status == RequestStatus.RUNNING]
        if self.draft is not None:
            self.draft.release_except({r.request_id for r in live})
        decoding = [r for r in live if r.num_computed_tokens == r.num_tokens - 1]
        base = sum(1 if r in decoding else r.num_tokens - r.num_computed_tokens for r in live)
        k, n = self.ctl.plan(len(decoding), base)
        if k == 0:
            return
        ks = [max(0, min(k, r.max_tokens - r.num_output_tokens - 1, self.max_model_len - r.num_tokens - 1))
              if i < n else 0 for i, r in enumerate(decoding)]
        drafting = sum(1 for kr in ks if kr)  # costs are observed at the number of requests that drafted
        t0 = time.perf_counter()
        if self.draft is None:
            for r, kr in zip(decoding, ks):
                self._record_hit(kr, self._set(r, propose_ngram(r.all_token_ids, kr, self.spec.prompt_lookup_min,
                                                                   self.spec.prompt_lookup_max) if kr else [], None))
            if drafting:
                self.ctl.propose_time.observe(drafting, time.perf_counter() - t0)
            return
        proposals = self.draft.propose(decoding, ks)
        if drafting:  # the draft's time per drafted position
            self.ctl.draft_per_position.observe(drafting, (time.perf_counter() - t0) / max(ks))
        for r, kr, (toks, probs) in zip(decoding, ks, proposals):
            self._record_hit(kr, self._set(r, toks, probs))

    def _set(self, r: Request, toks: list[int], probs: torch.Tensor | None) -> bool:
        if r.grammar is not None and toks:  # a constrained request drafts only what its grammar allows
            n = r.grammar.valid_prefix(toks)
            toks, probs = toks[:n], (probs[:n] if probs is not None and n else None)
        r.spec_token_ids, r.spec_draft_probs = toks, probs
        return bool(toks)

    def _record_hit(self, k: int, hit: bool) -> None:
        if k:
            self.ctl.stats.proposals += 1
            self.ctl.stats.hits += hit
