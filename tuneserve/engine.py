"""LLMEngine (add_request / step / abort) and the LLM facade for offline use.

One step: Scheduler.schedule() -> ModelRunner.execute() -> Scheduler.update() -> OutputProcessor
(detokenize, stop strings) -> RequestOutputs.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from tuneserve.config import EngineConfig
from tuneserve.core.kv_manager import KVGroupSpec, KVManager
from tuneserve.core.scheduler import Scheduler
from tuneserve.engine_args import EngineArgs
from tuneserve.models.loader import DTYPES, load_model
from tuneserve.output_processor import OutputProcessor, ParentState
from tuneserve.outputs import RequestOutput
from tuneserve.request import Request, RequestStatus
from tuneserve.runner import ModelRunner
from tuneserve.sampling_params import SamplingParams
from tuneserve.tokenizer import chat_prompt, load_tokenizer

PromptType = str | list[int] | dict


def log(msg: str) -> None:
    if os.environ.get("TUNESERVE_QUIET") != "1":
        print(f"[tuneserve] {msg}", file=sys.stderr, flush=True)


@dataclass
class PreparedRequest:
    """A validated user request: its output state and its n scheduler requests."""

    parent: ParentState
    children: list[Request]


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


def kv_groups(config: EngineConfig) -> list[KVGroupSpec]:
    """Layers grouped by attention window: one KV group per distinct window."""
    arch, cache = config.model.arch, config.cache
    by_window: dict[int, list[int]] = {}
    for layer in range(arch.num_layers):
        window = arch.window_of(layer) or cache.sliding_window
        by_window.setdefault(window, []).append(layer)
    sinks = cache.num_sink_tokens if cache.sliding_window else 0
    return [KVGroupSpec(tuple(layers), w, sinks if w == cache.sliding_window and w else 0)
            for w, layers in sorted(by_window.items())]


class LLMEngine:
    """Continuous-batching engine: add requests any time, call step() until they are done."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        torch.manual_seed(config.model.seed)
        m = config.model
        self.tokenizer = load_tokenizer(m.path, m.tokenizer)
        if m.quantization is not None:
            raise ValueError(f"quantization {m.quantization!r} is not available in this build yet")
        self.model = load_model(m.path, m.arch, torch.device(config.device), m.dtype)
        self.groups = kv_groups(config)
        num_blocks = self._num_blocks()
        self.kv = KVManager(self.groups, [num_blocks] * len(self.groups), config.cache.block_size,
                            config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(config, self.model, self.groups, [num_blocks] * len(self.groups))
        self.output = OutputProcessor(self.tokenizer)
        self.requests: dict[str, Request] = {}  # live child requests
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._pending_outputs: list[str] = []  # parents aborted outside step(), reported by the next step
        log(f"loaded {m.model} ({m.arch.architecture}, {m.arch.num_layers} layers) in "
            f"{time.perf_counter() - t0:.1f}s on {config.device}, dtype {m.dtype}")

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    def _num_blocks(self) -> int:
        c, a = self.config, self.config.model.arch
        elem = torch.finfo(DTYPES[c.model.dtype]).bits // 8
        per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * elem
        per_block = per_token * c.cache.block_size
        n = c.cache.kv_cache_memory_bytes // per_block
        if n < 2:
            raise ValueError(f"kv_cache_memory_bytes ({c.cache.kv_cache_memory_bytes}) holds {n} blocks of "
                             f"{per_block} bytes; give at least {2 * per_block}")
        log(f"KV cache: {n - 1} blocks x {c.cache.block_size} tokens, {per_token:,} bytes/token, "
            f"fits {(n - 1) * c.cache.block_size:,} tokens ({n * per_block / 2**20:.0f} MiB)")
        return int(n)

    # ----- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text, token ids or {"prompt" | "prompt_token_ids"}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        ids = list(prompt)
        vocab = self.config.model.arch.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
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
        text, ids = self.tokenize_prompt(prompt)
        params = self._resolve_max_tokens(ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children: list[Request] = []
        for i in range(params.n):
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(cid, ids, params.for_child(i), self.config.model.arch.eos_token_ids, arrival,
                                    priority, leader_id=None if i == 0 else children[0].request_id))
        self.scheduler.check_admissible(children[0])
        return PreparedRequest(ParentState(request_id, text, ids, {}, arrival), children)

    def submit(self, prepared: PreparedRequest) -> str:
        """Queue a prepared request (engine thread only)."""
        parent = prepared.parent
        if parent.request_id in self.output.parents:
            raise ValueError(f"request id {parent.request_id!r} is already in use")
        for req in prepared.children:
            self.scheduler.add_request(req)
            self.requests[req.request_id] = req
        self.output.add(parent, prepared.children)
        self.stats.prompt_tokens += len(parent.prompt_token_ids)
        return parent.request_id

    def _resolve_max_tokens(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        limit = self.config.model.max_model_len
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        room = limit - len(ids)
        if params.max_tokens is None:
            if room < 1:
                raise ValueError(f"prompt ({len(ids)} tokens) leaves no room to generate within the model's "
                                 f"context length ({limit}); shorten the prompt")
            import dataclasses

            return dataclasses.replace(params, max_tokens=room)
        if len(ids) + params.max_tokens > limit:
            raise ValueError(f"this model's context length is {limit} tokens, but the prompt has {len(ids)} "
                             f"tokens and max_tokens is {params.max_tokens} ({len(ids) + params.max_tokens} in "
                             f"all); shorten the prompt or lower max_tokens")
        return params

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Abort user requests (all their samples); their KV blocks are free on return."""
        for pid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            parent = self.output.parents.get(pid)
            if parent is None:
                continue
            self.scheduler.abort(list(parent.children))
            for cid in parent.children:
                req = self.requests.get(cid)
                if req is not None and req.is_finished:
                    self._finish_child(req)
            self._pending_outputs.append(pid)

    # ----- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of user requests that changed."""
        touched: dict[str, None] = dict.fromkeys(self._pending_outputs)
        self._pending_outputs = []
        sched = self.scheduler.schedule()
        if sched.requests:
            out = self.runner.execute(sched)
            self.scheduler.update(sched, out)
            self.stats.num_steps += 1
            for i, sr in enumerate(sched.requests):
                req = self.requests.get(sr.req_id)
                if req is None:
                    continue
                if out.prompt_logprobs[i]:
                    self.output.on_prompt_logprobs(req, out.prompt_logprobs[i])
                if out.sampled[i]:
                    before = len(self.output.parents[self.output.parent_of(req.request_id)].children[
                        req.request_id].token_ids)
                    if self.output.on_tokens(req, out.sampled[i], out.logprobs[i]):
                        self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
                    self.stats.generation_tokens += req.num_output_tokens - before
                if req.is_finished:
                    self._finish_child(req)
                touched[self.output.parent_of(req.request_id)] = None
        elif sched.finished_req_ids:
            self.runner.execute(sched)  # lets the runner drop state of finished requests
        results = []
        for pid in touched:
            if pid is None or pid not in self.output.parents:
                continue
            ro = self.output.output(pid)
            results.append(ro)
            if ro.finished:
                self.output.pop(pid)
        return results

    def _finish_child(self, req: Request) -> None:
        if self.requests.pop(req.request_id, None) is None:
            return
        self.output.on_finished(req)
        reason = req.finish_reason or "abort"
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def has_unfinished_requests(self) -> bool:
        return bool(self.output.parents) or bool(self._pending_outputs)

    def get_stats(self) -> EngineStats:
        s = self.stats
        s.num_running, s.num_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_cache_usage = self.kv.usage
        s.prefix_cache_queries, s.prefix_cache_hits = self.kv.prefix_queries, self.kv.prefix_hits
        s.num_preemptions = self.scheduler.num_preemptions
        return s


class LLM:
    """Offline batch inference: LLM(model=...).generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str | None = None, **engine_args) -> None:
        if model is not None:
            engine_args["model"] = model
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs.from_dict(engine_args))

    def get_tokenizer(self):  # noqa: ANN201 - an HF tokenizer
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns RequestOutputs in prompt order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids.append(engine.add_request(None, prompt, p or SamplingParams(),
                                          priority=priority[i] if priority else 0))
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, using the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [chat_prompt(self.get_tokenizer(), c, add_generation_prompt, chat_template) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm, leave=False)
        try:
            while len(done) < len(ids):
                for ro in engine.step():
                    if ro.finished:
                        done[ro.request_id] = ro
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in done])
            engine.step()
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]
