"""LLMEngine: add_request / step / abort_request.

One step: Scheduler.schedule(), then the core step (core_step.py: ModelRunner.execute, Scheduler.update),
then output emission (OutputProcessor: detokenize, stop strings -> RequestOutputs), then drafts for the
next step. Failures are isolated per request (isolation.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch

from tuneserve import faults
from tuneserve.config import EngineConfig
from tuneserve.core.kv_layout import kv_groups
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request, RequestStatus
from tuneserve.core.scheduler import Scheduler
from tuneserve.engine.core_step import StepResult, execute_and_update, propose_drafts
from tuneserve.engine.intake import PromptType, tokenize_prompt
from tuneserve.engine.isolation import fail_request, reset_after_failed_step
from tuneserve.engine.output_processor import OutputProcessor, ParentState
from tuneserve.engine.prepared import PreparedRequest, aborted_output
from tuneserve.engine.stats import EngineStats
from tuneserve.engine_args import EngineArgs
from tuneserve.errors import EngineFatalError, RequestError
from tuneserve.kernels.config import resolve as resolve_kernels
from tuneserve.kernels.cpu_build import flushing_denormals
from tuneserve.loading import load_model
from tuneserve.log import log
from tuneserve.outputs import RequestOutput
from tuneserve.overflow.policy import fit_prompt
from tuneserve.overflow.summarize import finish_summary, is_summary, parent_id_of_summary, plan_summary
from tuneserve.parallel.group import RankGroup
from tuneserve.parallel.rank import load_shard
from tuneserve.parallel.shard import local_kv_heads
from tuneserve.quant.linear import model_weight_bytes
from tuneserve.resources import peak_rss_bytes
from tuneserve.sampling_params import ParamError, SamplingParams
from tuneserve.speculative.decoder import SpecDecoder
from tuneserve.speculative.draft import DraftProposer, draft_engine_config
from tuneserve.structured.llguidance_backend import LLGuidanceBackend
from tuneserve.tokenizer import load_tokenizer
from tuneserve.worker.kv_cache import block_bytes, build_kv, plan_blocks, token_bytes
from tuneserve.worker.model_runner import ModelRunner


class LLMEngine:
    """Continuous-batching engine: add requests any time, call step() until they are done."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        torch.manual_seed(config.model.seed)
        m = config.model
        self.tokenizer = load_tokenizer(m.path, m.tokenizer)
        self.ranks = RankGroup(config, config.tensor_parallel_all_reduce) if config.tensor_parallel_size > 1 else None
        if self.ranks is None:
            kernels = resolve_kernels(m.kernels, m.quant_activations, m.prompt_attention)
            self.model = load_model(m.path, m.arch, torch.device(config.device), m.dtype,
                                    quantization=m.quantization, kernels=kernels)
        else:  # the other ranks load theirs meanwhile
            self.model = load_shard(config, 0, self.ranks.comm)
        self.threads = torch.get_num_threads()  # per rank (RankGroup shares them out)
        self.groups = kv_groups(config)
        uses_draft = config.spec is not None and config.spec.method == "draft"
        draft_config = draft_engine_config(config.spec, config) if uses_draft else None
        target_memory, draft_memory = self._split_kv_budget(draft_config)
        self.num_blocks = plan_blocks(config, self.groups, target_memory)
        self.build_scheduler()
        kv_heads = local_kv_heads(m.arch, config.tensor_parallel_size)
        self.runner = ModelRunner(config, self.model, build_kv(config, self.groups, self.num_blocks, kv_heads))
        if self.ranks is not None:
            weakref.finalize(self, self.ranks.close)  # an engine dropped without shutdown() stops its ranks
            self.ranks.start(self.num_blocks)
            self.runner.peers = self.ranks
        self.output = OutputProcessor(self.tokenizer)
        self.spec = None
        if config.spec is not None:
            draft = DraftProposer(config.spec, draft_config, draft_memory, self.tokenizer) if draft_config else None
            self.spec = SpecDecoder(config.spec, m.max_model_len, self.runner, draft)
        self.requests: dict[str, Request] = {}  # live child requests
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending_outputs: list[str] = []  # parents aborted outside step(), reported by the next step
        self.summaries: dict[str, PreparedRequest] = {}  # requests waiting for their prompt's summary
        self.unstarted_outputs: list[RequestOutput] = []  # ended while summarizing: reported next step
        self.step_ids: list[str] | None = None  # the running step's requests (None: not yet scheduled)
        self.resetting = False  # recovering from a failed step (engine/isolation.py)
        self._grammars: LLGuidanceBackend | None = None  # built with the first constrained request
        self._grammars_lock = threading.Lock()
        log(f"loaded {m.model} ({m.arch.architecture}, {m.arch.num_layers} layers) in "
            f"{time.perf_counter() - t0:.1f}s on {config.device}, dtype {m.dtype}, "
            f"quantization {m.quantization or 'none'}; {self._memory_line()}")

    def _memory_line(self) -> str:
        """Peak RSS so far against what the weights hold and the checkpoint file (a single-file one)."""
        mib = 2**20
        line = (f"peak RSS {peak_rss_bytes() / mib:,.0f} MiB, weights {self.footprint()['weight_bytes'] / mib:,.0f} "
                f"MiB")
        path = Path(self.config.model.path)
        return line + (f", file {path.stat().st_size / mib:,.0f} MiB" if path.is_file() else "")

    def build_scheduler(self) -> None:
        """A fresh KV manager (every block free) and scheduler (no requests): at start and after a reset."""
        c = self.config
        self.kv = KVManager(self.groups, self.num_blocks, c.cache.block_size, c.cache.enable_prefix_caching,
                            c.scheduler.max_num_batched_tokens)
        self.scheduler = Scheduler(c.scheduler, self.kv)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    def _split_kv_budget(self, draft_config: EngineConfig | None) -> tuple[int, int]:
        """kv_cache_memory_bytes for the target and the draft model: in proportion to the bytes each
        takes per token, so that both hold the same tokens (the draft keeps KV for the same requests)."""
        memory = self.config.cache.kv_cache_memory_bytes
        if draft_config is None:
            return memory, 0
        target, draft = token_bytes(self.config), token_bytes(draft_config)
        draft_memory = memory * draft // (target + draft)
        log(f"KV budget {memory / 2**20:.0f} MiB: {(memory - draft_memory) / 2**20:.0f} MiB target, "
            f"{draft_memory / 2**20:.0f} MiB draft model ({target:,} and {draft:,} bytes/token)")
        return memory - draft_memory, draft_memory

    def kv_block_bytes(self) -> list[int]:
        """Bytes of one KV block in each group (K and V of every layer of the group)."""
        return block_bytes(self.config, self.groups)

    # ----- requests -------------------------------------------------------------------------
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
        text, ids = tokenize_prompt(self.tokenizer, self.config.model.arch.vocab_size, prompt)
        limit = self.config.model.max_model_len
        try:
            plan = fit_prompt(ids, params.max_tokens, limit, self.config.overflow_policy)
        except ValueError as e:  # the field to change: max_tokens, unless the prompt alone fills the context
            field = "max_tokens" if params.max_tokens is not None and 0 < len(ids) < limit else "prompt"
            raise ParamError(field, str(e)) from None
        params = dataclasses.replace(params, max_tokens=plan.max_tokens)
        grammar = self._compile_grammar(params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        parent = ParentState(request_id, text, plan.ids, {}, arrival, metadata=plan.metadata)
        if plan.middle is not None:  # overflow_policy summarize: first the summary, then the request
            m = self.config.model
            job = plan_summary(self.tokenizer, m.max_model_len, m.arch.eos_token_ids, request_id, plan, arrival,
                               priority)
            parent.metadata.update(job.metadata)
            self.scheduler.check_admissible(job.request)
            self.scheduler.check_fits(len(plan.ids), plan.max_tokens)  # the request that follows the summary
            return PreparedRequest(parent, [], params, priority, job, grammar)
        prepared = PreparedRequest(parent, [], params, priority, grammar=grammar)
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
        if prepared.grammar is not None:
            for req in kids:
                req.grammar = self.grammars().matcher(prepared.grammar)
        prepared.children = kids

    def grammars(self) -> LLGuidanceBackend:
        """The structured-output backend, built on first use (it indexes the whole vocabulary)."""
        with self._grammars_lock:
            if self._grammars is None:
                m = self.config.model
                self._grammars = LLGuidanceBackend(self.tokenizer, m.arch.vocab_size, m.arch.eos_token_ids)
                self.runner.grammars = self._grammars
                if self.spec is not None and self.spec.draft is not None:  # drafts of constrained requests
                    self.spec.draft.runner.grammars = self._grammars
            return self._grammars

    def _compile_grammar(self, params: SamplingParams) -> object:
        """The compiled grammar of a constrained request (cached by grammar), or None; a ParamError saying
        what is wrong or unsupported."""
        if params.structured_outputs is None:
            return None
        try:
            return self.grammars().compile(params.structured_outputs)
        except ValueError as e:
            field = params.structured_outputs.field
            raise ParamError(field, f"{field} is invalid or unsupported: {e}") from None

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
        except EngineFatalError:
            raise
        except Exception as e:  # noqa: BLE001 - not pinned to one request
            return reset_after_failed_step(self, e)

    def _step(self) -> list[RequestOutput]:
        """schedule -> execute -> update (core_step.py), then output emission, then drafting."""
        touched: dict[str, None] = dict.fromkeys(self._pending_outputs)  # user requests whose output changed
        self._pending_outputs = []
        results, self.unstarted_outputs = self.unstarted_outputs, []
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        self.step_ids = [sr.req_id for sr in sched.requests]
        if sched.requests:
            step = execute_and_update(sched, self.scheduler, self.runner, self.spec, self.stats, started)
            touched.update(dict.fromkeys(self._emit(step)))
        propose_drafts(self.spec, self.scheduler.running, self.stats)
        return results + self._collect(touched)

    # ----- output emission ------------------------------------------------------------------
    def _emit(self, step: StepResult) -> list[str]:
        """Take each scheduled request's results into its user request's output; returns the user
        requests touched (an internal summary touches none)."""
        touched = []
        for i, sr in enumerate(step.sched.requests):
            req = self.requests.get(sr.req_id)
            if req is not None and (pid := self._apply(req, i, step)) is not None:
                touched.append(pid)
        return touched

    def _apply(self, req: Request, i: int, step: StepResult) -> str | None:
        """One request's step results into its output. An error pinned to it (runner, scheduler update,
        or here) ends its user request in error. Returns its user request's id (None: a summary)."""
        out, update_error = step.out, step.update_errors.get(req.request_id)
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
            if self.output.on_tokens(req, sampled, logprobs):  # a stop string ended it
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            self.stats.generation_tokens += req.num_output_tokens - before
        if req.is_finished:
            self.finish_child(req)

    def _collect(self, touched: dict[str, None]) -> list[RequestOutput]:
        """The outputs of the touched user requests; finished ones leave the output processor."""
        results = []
        for pid in touched:
            ro = self.output.output(pid) if pid in self.output.parents else None
            if ro is not None:
                results.append(ro)
                if ro.finished:
                    self.output.pop(pid)
        return results

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
        prompt_ids, metadata = finish_summary(self.tokenizer, prepared.summary)
        prepared.parent.prompt_token_ids = prompt_ids
        prepared.parent.metadata.update(metadata)
        self.stats.prompt_tokens += len(req.prompt_token_ids)
        self.make_children(prepared)
        prepared.summary = None
        self.submit(prepared)

    def footprint(self) -> dict[str, int]:
        """What this engine holds: weight bytes (every tensor-parallel rank's and a draft model's included), KV
        cache bytes, their sum, and the torch threads it runs on (over all ranks)."""
        weights = model_weight_bytes(self.model)
        if self.ranks is not None:  # the other ranks' shards (each holds the embedding and head too)
            weights += sum(self.ranks.weight_bytes)
        if self.spec is not None and self.spec.draft is not None:
            weights += model_weight_bytes(self.spec.draft.runner.model)
        kv = int(self.config.cache.kv_cache_memory_bytes)
        return {"weight_bytes": weights, "kv_cache_bytes": kv, "memory_bytes": weights + kv,
                "threads": self.threads * self.config.tensor_parallel_size}

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op for one rank); the engine cannot step afterwards."""
        if self.ranks is not None:
            self.ranks.close()
            self.runner.peers = None
            self.ranks = None

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
        s.structured_mask_seconds = self.runner.mask_seconds
        s.all_reduce_seconds = self.ranks.comm.seconds if self.ranks is not None else 0.0
        return s


