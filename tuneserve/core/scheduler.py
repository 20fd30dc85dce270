"""Scheduler: token-budget continuous batching with chunked prefill, prefix caching and preemption.

There is no prefill phase and no decode phase. Each request has `num_computed_tokens` catching up with
its tokens (prompt + output + speculative drafts); every step hands out at most
`max_num_batched_tokens` tokens, running requests first (oldest first), then waiting ones while
sequence slots, budget and blocks last. A prompt longer than the remaining budget is cut into chunks
that share steps with decodes. When blocks run out, the newest (or lowest-priority) running request is
preempted: its blocks are freed and it recomputes later, usually from its own cached prefix blocks.
"""

from __future__ import annotations

import bisect
import itertools
import time

from tuneserve import faults
from tuneserve.config import SchedulerConfig
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request, RequestStatus, count_spec_step
from tuneserve.core.step_io import RunnerOutput, ScheduledRequest, SchedulerOutput
from tuneserve.errors import GrammarError


class Scheduler:
    """Decides, each step, which requests run and how many tokens each; applies the results."""

    def __init__(self, config: SchedulerConfig, kv: KVManager) -> None:
        self.config = config
        self.kv = kv
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[tuple[int, int], Request]] = []  # sorted by queue key
        self.running: list[Request] = []
        self.finished_ids: set[str] = set()  # since the last schedule()
        self.num_preemptions = 0
        self._arrival_seq = itertools.count()
        self._queue_key: dict[str, tuple[int, int]] = {}

    # ----- admission ------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request; raise ValueError if it could never run."""
        self.check_admissible(req)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        priority = req.priority if self.config.policy == "priority" else 0
        self._queue_key[req.request_id] = (priority, next(self._arrival_seq))
        self.requests[req.request_id] = req
        self._enqueue(req)

    def check_admissible(self, req: Request) -> None:
        """Raise ValueError, saying what to change, if req could never be scheduled."""
        self.check_fits(req.num_prompt_tokens, req.max_tokens)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ValueError, saying what to change, if a request of this size could never be scheduled."""
        total = num_prompt_tokens + max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                f"max_model_len ({self.config.max_model_len}); shorten the prompt or lower max_tokens")
        if not self.kv.can_ever_fit(total):
            raise ValueError(
                f"request needs KV for {total} tokens, more than the whole KV cache holds "
                f"({(self.kv.pools[0].num_blocks - 1) * self.kv.block_size} tokens); raise "
                f"kv_cache_memory_bytes or lower max_tokens")
        if not self.config.enable_chunked_prefill and num_prompt_tokens > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt ({num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}) with chunked prefill off; enable it or raise the budget")

    def queue_key(self, req_id: str) -> tuple[int, int]:
        """(priority, arrival order) of a live request: its place in the queue."""
        return self._queue_key[req_id]

    def _enqueue(self, req: Request) -> None:
        bisect.insort(self.waiting, (self._queue_key[req.request_id], req), key=lambda e: e[0])

    # ----- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts within the token budget and the KV blocks."""
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted_any = False
        for req in list(self.running):
            if budget <= 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(self._num_pending(req), budget)
            while not self.kv.allocate_slots(req, num_new):
                victim = self._pick_victim()
                budget += self._preempt(victim, scheduled)
                preempted_any = True
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                scheduled[req.request_id] = self._make_scheduled(req, num_new)
                budget -= num_new
        if not preempted_any:
            budget = self._admit_waiting(budget, scheduled)
        out = SchedulerOutput(
            requests=list(scheduled.values()),
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            finished_req_ids=self.finished_ids,
            num_preempted=int(preempted_any),
        )
        self.finished_ids = set()
        return out

    def _num_pending(self, req: Request) -> int:
        """Tokens of req (drafts included) not yet computed, capped by the model length."""
        pending = req.num_tokens + len(req.spec_token_ids) - req.num_computed_tokens
        return min(pending, self.config.max_model_len - req.num_computed_tokens)

    def _admit_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest]) -> int:
        now = time.monotonic()
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[i][1]
            if self._blocked_by_leader(req):
                i += 1
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            num_new = req.num_tokens - num_hit
            if not self.config.enable_chunked_prefill and num_new > budget:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate_slots(req, num_new, hit_blocks):
                break  # no preemption for waiting requests: they wait for blocks
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            del self.waiting[i]
            req.num_computed_tokens = num_hit
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = self._make_scheduled(req, num_new)
            budget -= num_new
        return budget

    def _blocked_by_leader(self, req: Request) -> bool:
        """n > 1 siblings wait until their leader's prompt is computed, then share its cached blocks."""
        if req.leader_id is None or not self.kv.enable_caching:
            return False
        leader = self.requests.get(req.leader_id)
        return leader is not None and leader.num_computed_tokens < leader.num_prompt_tokens

    def _make_scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        end = start + num_new
        tokens = req.all_token_ids[start:end]
        num_draft = max(0, end - req.num_tokens)
        draft_probs = None
        if num_draft:
            tokens.extend(req.spec_token_ids[:num_draft])
            if req.spec_draft_probs is not None:
                draft_probs = req.spec_draft_probs[:num_draft]
        return ScheduledRequest(
            req_id=req.request_id,
            token_ids=tokens,
            start_pos=start,
            block_table=self.kv.block_ids(req),
            params=req.params,
            sample=end >= req.num_tokens,
            num_draft_tokens=num_draft,
            draft_probs=draft_probs,
            prompt_len=req.num_prompt_tokens,
            all_token_ids=req.all_token_ids,
            grammar=req.grammar,
        )

    def _pick_victim(self) -> Request:
        """The running request to preempt: lowest priority, newest among equals."""
        return max(self.running, key=lambda r: self._queue_key[r.request_id])

    def _preempt(self, req: Request, scheduled: dict[str, ScheduledRequest]) -> int:
        """Free req's blocks and queue it to recompute; returns the budget it gives back."""
        self.kv.free(req)
        self.running.remove(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids, req.spec_draft_probs = [], None
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req)
        given_back = scheduled.pop(req.request_id, None)
        return given_back.num_tokens if given_back else 0

    # ----- results --------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, out: RunnerOutput) -> dict[str, Exception]:
        """Apply a step's results: advance computed tokens, append samples, stop, free. Requests the runner
        failed are left alone; returns those whose own update raised (request id -> exception), which the
        engine finishes in error like the runner's."""
        now = time.monotonic()
        errors: dict[str, Exception] = {}
        for i, sr in enumerate(sched.requests):
            req = self.requests.get(sr.req_id)
            if req is None or req.status != RequestStatus.RUNNING or i in out.errors:
                continue  # aborted during the step, or failed in the runner
            try:
                self._update_one(req, sr, out, i, now)
            except Exception as e:  # noqa: BLE001 - pinned to this request
                errors[req.request_id] = e
        return errors

    def _update_one(self, req: Request, sr: ScheduledRequest, out: RunnerOutput, i: int, now: float) -> None:
        accepted = out.num_accepted[i] if out.num_accepted else 0
        req.num_computed_tokens += sr.num_tokens - (sr.num_draft_tokens - accepted)
        req.spec_token_ids, req.spec_draft_probs = [], None
        if sr.num_draft_tokens and out.sampled[i]:
            count_spec_step(req, sr.num_draft_tokens, accepted)
        for token in out.sampled[i]:
            req.append_token(token, now)
            faults.hit("stop_check", req.request_id)
            if req.check_stop(self.config.max_model_len) or self._grammar_done(req, token):
                break
        self.kv.cache_blocks(req)
        self.kv.remove_skipped_blocks(req)
        if req.is_finished:
            self._release(req, now)

    @staticmethod
    def _grammar_done(req: Request, token: int) -> bool:
        """Advance a constrained request's matcher over token; a complete grammar stops the request."""
        if req.grammar is None or req.is_finished or token in req.eos_token_ids:
            return False  # an EOS the request does not stop at (ignore_eos, min_tokens) is not grammar text
        if not req.grammar.accept([token]):  # masks allow only fitting tokens: the grammar itself gave up
            raise GrammarError(f"response_format, structured_outputs or tools: the grammar failed after "
                               f"{req.num_output_tokens} tokens ({req.grammar.error()}); a schema needs a finite "
                               "instance that a parser can follow")
        if req.grammar.is_terminated():
            req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, None
            return True
        return False

    def finish_requests(self, req_ids: list[str], status: RequestStatus) -> None:
        """End requests from outside (abort, or a stop string seen by the detokenizer)."""
        now = time.monotonic()
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                self.waiting = [e for e in self.waiting if e[1] is not req]
            req.status = status
            self._release(req, now)

    def abort(self, req_ids: list[str]) -> None:
        """Abort requests; their blocks are free at once."""
        self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def _release(self, req: Request, now: float) -> None:
        self.kv.free(req)
        req.grammar = None  # its matcher ends with it
        if req in self.running:
            self.running.remove(req)
        req.finished_time = now
        self.finished_ids.add(req.request_id)
        del self.requests[req.request_id]
        del self._queue_key[req.request_id]

    # ----- state ----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)
