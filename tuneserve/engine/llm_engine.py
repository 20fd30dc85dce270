"""LLMEngine (add_request / step / abort) and the LLM facade for offline use.

One step: Scheduler.schedule() -> ModelRunner.execute() -> Scheduler.update() -> OutputProcessor
(detokenize, stop strings) -> RequestOutputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from tuneserve import faults
from tuneserve.config import EngineConfig
from tuneserve.core.kv_layout import kv_groups, split_kv_blocks
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request, RequestStatus, count_spec_step
from tuneserve.core.scheduler import Scheduler
from tuneserve.dtypes import element_bytes
from tuneserve.engine.isolation import count_error, fail_request, reset_after_failed_step
from tuneserve.engine.output_processor import OutputProcessor, ParentState
from tuneserve.engine_args import EngineArgs
from tuneserve.errors import RequestError
from tuneserve.kernels.cpu_build import flushing_denormals
from tuneserve.loading import load_model
from tuneserve.log import log
from tuneserve.outputs import RequestOutput
from tuneserve.overflow.policy import fit_prompt
from tuneserve.overflow.summarize import (
    SummaryJob,
    aborted_output,
    finish_summary,
    is_summary,
    parent_id_of_summary,
    plan_summary,
)
from tuneserve.sampling_params import ParamError, SamplingParams, utf8_error
from tuneserve.tokenizer import load_tokenizer
from tuneserve.worker.model_runner import ModelRunner

PromptType = str | list[int] | dict


@dataclass
class PreparedRequest:
    """A validated user request: its output state, its n scheduler requests, and (overflow_policy
    summarize) the summary job that must finish before they can be made."""

    parent: ParentState
    children: list[Request]
    params: SamplingParams | None = None
    priority: int = 0
    summary: SummaryJob | None = None


@dataclass
class EngineStats:
    """Counters and gauges for /metrics and benchmarks."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    num_steps: int = 0
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)  # accepted drafts at position 0, 1, ...
    errors: dict[str, int] = field(default_factory=dict)  # engine errors by kind (engine/isolation.py)
    num_blocks_in_use: int = 0  # leak checks: 0 once every request has ended
    num_block_refs: int = 0
    num_live_requests: int = 0


class LLMEngine:
    """Continuous-batching engine: add requests any time, call step() until they are done."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        torch.manual_seed(config.model.seed)
        m = config.model
        self.tokenizer = load_tokenizer(m.path, m.tokenizer)
        self.model = load_model(m.path, m.arch, torch.device(config.device), m.dtype, quantization=m.quantization)
        self.groups = kv_groups(config)
        self.num_blocks = self._num_blocks()
        self.build_scheduler()
        self.runner = ModelRunner(config, self.model, self.groups, self.num_blocks)
        self.output = OutputProcessor(self.tokenizer)
        self.spec = None
        if config.spec is not None:
            from tuneserve.speculative.decoder import SpecDecoder

            self.spec = SpecDecoder(config.spec, self)
        self.requests: dict[str, Request] = {}  # live child requests
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending_outputs: list[str] = []  # parents aborted outside step(), reported by the next step
        self.summaries: dict[str, PreparedRequest] = {}  # requests waiting for their prompt's summary
        self.unstarted_outputs: list[RequestOutput] = []  # ended while summarizing: reported next step
        self.step_ids: list[str] | None = None  # the running step's requests (None: not yet scheduled)
        self.resetting = False  # recovering from a failed step (engine/isolation.py)
        log(f"loaded {m.model} ({m.arch.architecture}, {m.arch.num_layers} layers) in "
            f"{time.perf_counter() - t0:.1f}s on {config.device}, dtype {m.dtype}")

    def build_scheduler(self) -> None:
        """A fresh KV manager (every block free) and scheduler (no requests): at start and after a reset."""
        c = self.config
        self.kv = KVManager(self.groups, self.num_blocks, c.cache.block_size, c.cache.enable_prefix_caching,
                            c.scheduler.max_num_batched_tokens)
        self.scheduler = Scheduler(c.scheduler, self.kv)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    def kv_block_bytes(self) -> list[int]:
        """Bytes of one KV block in each group (K and V of every layer of the group)."""
        c, a = self.config, self.config.model.arch
        elem = element_bytes(c.model.dtype)
        per_layer_token = 2 * a.num_kv_heads * a.head_dim * elem
        return [per_layer_token * len(g.layers) * c.cache.block_size for g in self.groups]

    def _num_blocks(self) -> list[int]:
        """Blocks per KV group out of kv_cache_memory_bytes (kv_manager.split_kv_blocks)."""
        c = self.config
        bs, memory = c.cache.block_size, c.cache.kv_cache_memory_bytes
        block_bytes = self.kv_block_bytes()
        counts = split_kv_blocks(self.groups, block_bytes, memory, bs, c.scheduler.max_num_seqs,
                                 c.scheduler.max_num_batched_tokens)
        if min(counts) < 2:
            raise ValueError(f"kv_cache_memory_bytes ({memory}) cannot hold 2 blocks per KV group; give at "
                             f"least {2 * sum(block_bytes)}")
        parts = []
        for spec, n, nbytes in zip(self.groups, counts, block_bytes):
            sinks = f" + {spec.num_sink_tokens} sinks" if spec.num_sink_tokens else ""
            kind = f"window {spec.window}{sinks}" if spec.window else "full attention"
            parts.append(f"{len(spec.layers)} layers ({kind}): {n - 1} blocks, {nbytes // bs:,} bytes/token, "
                         f"{n * nbytes / 2**20:.0f} MiB")
        full = [n for spec, n in zip(self.groups, counts) if not spec.window]
        fits = f"fits {(min(full) - 1) * bs:,} tokens" if full else "each request's KV bounded by its window"
        log(f"KV cache ({bs} tokens/block, {fits}): " + "; ".join(parts))
        return counts

    # ----- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
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
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)):
            raise ParamError("prompt", f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        ids = list(prompt)
        vocab = self.config.model.arch.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ParamError("prompt", f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        return None, ids

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> str:
        """Validate and queue a request (n samples fan out into n scheduler requests). Returns its id."""
        return self.submit(self.prepare_request(request_id, prompt, params, arrival_time, priority))

    def prepare_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                        arrival_time: float | None = None, priority: int = 0) -> PreparedRequest:
        """Tokenize and validate a request without touching engine state (safe from any thread).

        Raises ValueError, saying what to change, for anything that could never run."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        params.check_vocab(self.config.model.arch.vocab_size)
        text, ids = self.tokenize_prompt(prompt)
        limit = self.config.model.max_model_len
        try:
            plan = fit_prompt(ids, params.max_tokens, limit, self.config.overflow_policy)
        except ValueError as e:  # the field to change: max_tokens, unless the prompt alone fills the context
            field = "max_tokens" if params.max_tokens is not None and 0 < len(ids) < limit else "prompt"
            raise ParamError(field, str(e)) from None
        params = dataclasses.replace(params, max_tokens=plan.max_tokens)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentState(request_id, text, plan.ids, {}, arrival, metadata=plan.metadata)
        if plan.middle is not None:  # overflow_policy summarize: first the summary, then the request
            job = plan_summary(self, parent, plan, params, priority)
            self.scheduler.check_admissible(job.request)
            self.scheduler.check_fits(len(plan.ids), plan.max_tokens)  # the request that follows the summary
            return PreparedRequest(parent, [], params, priority, job)
        prepared = PreparedRequest(parent, [], params, priority)
        self.make_children(prepared)
        self.scheduler.check_admissible(prepared.children[0])
        return prepared

    def make_children(self, prepared: PreparedRequest) -> None:
        """The n scheduler requests of a user request (siblings share the leader's prompt blocks)."""
        p, params = prepared.parent, prepared.params
        kids: list[Request] = []
        for i in range(params.n):
            cid = p.request_id if params.n == 1 else f"{p.request_id}#{i}"
            kids.append(Request(cid, p.prompt_token_ids, params.for_child(i), self.config.model.arch.eos_token_ids,
                                p.arrival_time, prepared.priority, leader_id=kids[0].request_id if kids else None))
        prepared.children = kids

    def submit(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (engine thread only)."""
        parent = prepared.parent
        if parent.request_id in self.output.parents or parent.request_id in self.summaries:
            raise ValueError(f"request id {parent.request_id!r} is already in use")
        if prepared.summary is not None:
            job = prepared.summary
            self.scheduler.add_request(job.request)
            self.requests[job.request.request_id] = job.request
            self.summaries[parent.request_id] = prepared
            return parent.request_id
        for req in prepared.children:
            self.scheduler.add_request(req)
            self.requests[req.request_id] = req
        self.output.add(parent, prepared.children)
        self.stats.prompt_tokens += len(parent.prompt_token_ids)
        return parent.request_id

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort user requests (all their samples); their KV blocks are free on return."""
        for pid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            waiting_summary = self.summaries.pop(pid, None)
            if waiting_summary is not None:
                self.scheduler.abort([waiting_summary.summary.request.request_id])
                self.requests.pop(waiting_summary.summary.request.request_id, None)
                self.unstarted_outputs.append(aborted_output(waiting_summary))
                continue
            parent = self.output.parents.get(pid)
            if parent is None:
                continue
            self.scheduler.abort(list(parent.children))
            for cid in parent.children:
                req = self.requests.get(cid)
                if req is not None and req.is_finished:
                    self.finish_child(req)
            self._pending_outputs.append(pid)

    # ----- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of user requests that changed.

        A failure pinned to one request ends that request in error and the step goes on; any other
        failure ends the step's requests in error and resets the engine (engine/isolation.py). Raises only
        EngineFatalError, when that reset fails."""
        self.step_ids = None
        try:
            with flushing_denormals():  # this thread only, and only for the step
                return self._step()
        except Exception as e:  # noqa: BLE001 - not pinned to one request
            return reset_after_failed_step(self, e)

    def _step(self) -> list[RequestOutput]:
        touched: dict[str, None] = dict.fromkeys(self._pending_outputs)
        self._pending_outputs = []
        results, self.unstarted_outputs = self.unstarted_outputs, []
        t0 = time.perf_counter()  # the step's cost includes scheduling: it grows with the drafts too
        sched = self.scheduler.schedule()
        self.step_ids = [sr.req_id for sr in sched.requests]
        if sched.requests:
            out = self.runner.execute(sched)
            update_errors = self.scheduler.update(sched, out)
            self.stats.num_steps += 1
            self._count_spec(out)
            if self.spec is not None:
                self.spec.observe(sched, out, time.perf_counter() - t0)
            for i, sr in enumerate(sched.requests):
                req = self.requests.get(sr.req_id)
                if req is not None:
                    touched[self._apply(req, i, out, update_errors.get(sr.req_id))] = None
        self._propose()
        for pid in touched:
            ro = self.output.output(pid) if pid in self.output.parents else None
            if ro is not None:
                results.append(ro)
                if ro.finished:
                    self.output.pop(pid)
        return results

    def _apply(self, req: Request, i: int, out, update_error: Exception | None) -> str | None:  # noqa: ANN001
        """Take one request's step results into its output; returns its user request's id (None: a
        summary). An error pinned to it (runner, scheduler update, or here) ends it in error."""
        err = out.errors.get(i) or (update_error and RequestError.from_exception(update_error, "stop_check"))
        if err is None:
            try:
                if is_summary(req):
                    self._on_summary_progress(req)
                    return None
                self._take_output(req, out.sampled[i], out.logprobs[i], out.prompt_logprobs[i])
            except Exception as e:  # noqa: BLE001 - pinned to this request
                err = RequestError.from_exception(e, "detokenize")
        if err is not None:
            return fail_request(self, req, RequestError.from_exception(err, "request"))
        return self.output.parent_of(req.request_id)

    def _take_output(self, req: Request, sampled: list[int], logprobs, prompt_logprobs) -> None:  # noqa: ANN001
        if prompt_logprobs:
            self.output.on_prompt_logprobs(req, prompt_logprobs)
        if sampled:
            faults.hit("detokenize", req.request_id)
            before = self.output.num_tokens(req.request_id)
            if self.output.on_tokens(req, sampled, logprobs):
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            self.stats.generation_tokens += req.num_output_tokens - before
        if req.is_finished:
            self.finish_child(req)

    def _propose(self) -> None:
        """Drafts for the next step. Drafting is optional work: if it fails, this step's drafts are dropped
        and the draft model's state is released (it catches up again), and serving goes on."""
        if self.spec is None:
            return
        try:
            faults.hit("propose")
            self.spec.propose(self.scheduler.running)
        except Exception as e:  # noqa: BLE001 - speculation is an optimization
            count_error(self, "propose")
            log(f"drafting failed ({type(e).__name__}: {e}); this step goes on without drafts")
            for r in self.scheduler.running:
                r.spec_token_ids, r.spec_draft_probs = [], None
            if self.spec.draft is not None:
                self.spec.draft.release_except(set())

    def _count_spec(self, out) -> None:  # noqa: ANN001 - RunnerOutput
        for drafted, accepted in zip(out.num_draft_tokens, out.num_accepted):
            if drafted:
                count_spec_step(self.stats, drafted, accepted)

    def finish_child(self, req: Request) -> None:
        if self.requests.pop(req.request_id, None) is None:
            return
        self.output.on_finished(req)
        reason = req.finish_reason or "abort"
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _on_summary_progress(self, req: Request) -> None:
        """When a summary finishes, its user request starts with the summary in place of the middle."""
        if not req.is_finished:
            return
        self.requests.pop(req.request_id, None)
        prepared = self.summaries.pop(parent_id_of_summary(req), None)
        if prepared is None:
            return
        finish_summary(self, prepared)
        self.make_children(prepared)
        prepared.summary = None
        self.submit(prepared)

    def has_unfinished_requests(self) -> bool:
        return any((self.output.parents, self._pending_outputs, self.summaries, self.unstarted_outputs))

    def get_stats(self) -> EngineStats:
        s = self.stats
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_cache_usage = self.kv.usage
        s.prefix_cache_queries, s.prefix_cache_hits = self.kv.prefix_queries, self.kv.prefix_hits
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_blocks_in_use, s.num_block_refs = self.kv.num_blocks_in_use, self.kv.num_block_refs
        s.num_live_requests = len(self.output.parents) + len(self.summaries)
        return s


