"""ModelRunner: turns a SchedulerOutput into one forward pass over a ragged batch, then samples.

It owns the model and the paged KV cache tensors; a seeded request's randomness is a function of its seed
and output position (sample.position_generator), so the runner keeps no per-request state. Everything it
knows about requests comes from the SchedulerOutput; everything it returns goes in a RunnerOutput.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tuneserve import faults
from tuneserve.config import EngineConfig
from tuneserve.core.step_io import RunnerOutput, ScheduledRequest, SchedulerOutput, scatter_output
from tuneserve.errors import RequestError
from tuneserve.kernels.argmax_ops import argmax_rows
from tuneserve.kernels.attention import build_metadata
from tuneserve.models.layers import ForwardContext
from tuneserve.outputs import TokenLogprobs
from tuneserve.sample.rejection import rejection_sample, verify_coupled, verify_greedy
from tuneserve.sample.sampler import (
    SamplingRow,
    TokenSpan,
    apply_penalties,
    exponential_noise,
    position_generator,
    processed_probs,
    sample,
    token_logprobs,
)
from tuneserve.structured.backend import GrammarBackend
from tuneserve.worker.kv_cache import KVCache
from tuneserve.worker.logit_rows import LogitRows, RequestRows


class ModelRunner:
    """Runs the model for the scheduler's batches; holds the KV cache."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, kv: KVCache) -> None:
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.kv = kv
        self.groups = kv.groups
        self.block_size = config.cache.block_size
        self.eos_ids = config.model.arch.eos_token_ids
        self.grammars: GrammarBackend | None = None  # set by the engine with the first constrained request
        self.mask_seconds = 0.0  # the step's wait for grammar masks, and applying them (the cost of structure)
        # next-token masks are filled on this thread while the forward runs (llguidance releases the GIL)
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="tuneserve-masks")
        self._early_masks: Future | None = None
        self.peers = None  # the other tensor-parallel ranks (parallel/group.py): each forward starts there too

    # ----- one step -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run the scheduled tokens through the model and sample where the requests need it."""
        reqs = sched.requests
        if not reqs:
            return RunnerOutput.empty(0)
        errors = self._check_requests(reqs)
        live = [i for i in range(len(reqs)) if i not in errors]
        out = RunnerOutput.empty(0)
        if live:
            run = [reqs[i] for i in live]
            self._early_masks = self._fill_masks_early(run)
            try:
                faults.hit("forward")
                hidden = self.forward(run)  # (N, hidden): an exception here fails the whole step
                out = self._sample(run, hidden)
            finally:
                if self._early_masks is not None:
                    self._early_masks.exception()  # the matchers are the scheduler's again only after the fill
                self._early_masks = None
        return scatter_output(out, live, len(reqs), errors) if errors else out

    def _fill_masks_early(self, reqs: list[ScheduledRequest]) -> Future | None:
        """Start filling the masks of constrained requests that sample one token (their matchers do not move
        before the step ends): {request id: row}, bitmask."""
        constrained = [r for r in reqs if r.grammar is not None and r.sample and not r.num_draft_tokens]
        if not constrained:
            return None

        def fill() -> tuple[dict[str, int], torch.Tensor]:
            return {r.req_id: k for k, r in enumerate(constrained)}, self.fill_masks([r.grammar for r in constrained])

        return self._mask_pool.submit(fill)

    def fill_masks(self, matchers: list) -> torch.Tensor:  # noqa: ANN001 - backend.Matcher
        """A bitmask whose row k allows the tokens matchers[k] takes next."""
        bitmask = self.grammars.allocate_bitmask(len(matchers))
        for k, m in enumerate(matchers):
            m.fill_bitmask(bitmask, k)
        return bitmask

    def _check_requests(self, reqs: list[ScheduledRequest]) -> dict[int, Exception]:
        """Per-request checks before the batch is built: a request that fails one is left out of the
        forward and ends in error, so that one bad request cannot fail the others' step."""
        errors: dict[int, Exception] = {}
        vocab = self.config.model.arch.vocab_size
        for i, r in enumerate(reqs):
            try:
                faults.hit("prepare", r.req_id)
                if not r.token_ids or min(r.token_ids) < 0 or max(r.token_ids) >= vocab:
                    raise ValueError(f"token ids outside [0, {vocab}) or none to run")
                end = r.start_pos + r.num_tokens
                for g, table in enumerate(r.block_table):
                    if len(table) * self.block_size < end:
                        raise RuntimeError(f"KV group {g}: {len(table)} blocks cannot hold {end} tokens")
            except Exception as e:  # noqa: BLE001 - pinned to this request
                errors[i] = RequestError.from_exception(e, "prepare")
        return errors

    @torch.inference_mode()
    def time_forward(self, n: int) -> float:
        """Seconds for one forward (with logits) of n single-token sequences; they all write into the
        null block, which is only ever read masked, so the cache is untouched."""
        null = [[0]] * len(self.groups)
        reqs = [ScheduledRequest(f"_calib{i}", [0], 0, tuple(null), None, sample=True) for i in range(n)]
        t0 = time.perf_counter()
        self.model.compute_logits(self.forward(reqs))
        return time.perf_counter() - t0

    def forward(self, reqs: list[ScheduledRequest]) -> torch.Tensor:
        """Final hidden states (N, hidden) of a batch; with tensor parallelism every rank runs it too, and a
        failure between their all-reduces is fatal (the ranks would be out of step)."""
        if self.peers is None:
            ctx, ids = self.prepare_inputs(reqs)
            return self.model(ids, ctx)
        self.peers.send([(r.token_ids, r.start_pos, r.block_table) for r in reqs])
        try:
            ctx, ids = self.prepare_inputs(reqs)
            return self.model(ids, ctx)
        except Exception as e:  # noqa: BLE001 - re-raised as the group's fatal error
            raise self.peers.failed(e) from e

    def prepare_inputs(self, reqs: list[ScheduledRequest]) -> tuple[ForwardContext, torch.Tensor]:
        """The forward context (positions, attention metadata per layer, KV views) and input ids of a batch."""
        ids, positions = [], []
        for r in reqs:
            ids.extend(r.token_ids)
            positions.extend(range(r.start_pos, r.start_pos + r.num_tokens))
        metas = [
            build_metadata([(r.start_pos, r.num_tokens, r.block_table[g]) for r in reqs], self.block_size,
                           self.device, window=spec.window, sinks=spec.num_sink_tokens)
            for g, spec in enumerate(self.groups)
        ]
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        ctx = ForwardContext(pos, [metas[g] for g in self.kv.layer_group], self.kv.layers)
        return ctx, torch.tensor(ids, dtype=torch.long, device=self.device)

    def _sample(self, reqs: list[ScheduledRequest], hidden: torch.Tensor) -> RunnerOutput:
        plan = LogitRows.plan(reqs)
        if not plan.hidden_rows:
            return RunnerOutput.empty(len(reqs))
        logits = self.model.compute_logits(hidden[torch.tensor(plan.hidden_rows, device=self.device)])  # (R, V)
        try:
            return self._pick_tokens(reqs, plan.requests, logits)
        except Exception:  # noqa: BLE001 - pinned below by picking each request's tokens alone
            return self._pick_each(reqs, plan.requests, logits)

    def _pick_each(self, reqs: list[ScheduledRequest], rows: list[RequestRows], logits: torch.Tensor) -> RunnerOutput:
        """Batched picking failed: pick each request's tokens on its own, so that the requests at fault
        end in error and the others get what a clean step gives them (greedy and seeded picks repeat)."""
        parts, errors = [], {}
        for i, (r, own) in enumerate(zip(reqs, rows)):
            try:
                parts.append(self._pick_tokens([r], [own.local()], logits[own.all]))
            except Exception as e:  # noqa: BLE001 - pinned to this request
                kind = "verify" if r.num_draft_tokens else "sample"
                errors[i] = RequestError.from_exception(e, kind)
                parts.append(RunnerOutput.empty(1))
        return RunnerOutput.concat(parts, errors)

    def _pick_tokens(self, reqs: list[ScheduledRequest], rows: list[RequestRows], logits: torch.Tensor) -> RunnerOutput:
        # requests without drafts: one row each, sampled together
        plain = [(i, rr.end - 1) for i, (r, rr) in enumerate(zip(reqs, rows))
                 if rr.num_sample and not r.num_draft_tokens]
        emitted: list[list[int]] = [[] for _ in reqs]
        accepted = [0] * len(reqs)
        if plain:
            for i, _ in plain:
                faults.hit("sample", reqs[i].req_id)
            sampling = [self._sampling_row(reqs[i]) for i, _ in plain]
            masked = any(reqs[i].grammar is not None for i, _ in plain)
            picked = _rows_of(logits, [row for _, row in plain], masked)
            self._constrain(picked, [reqs[i] for i, _ in plain])
            chosen = sample(picked, sampling).tolist()
            for (i, _), tok in zip(plain, chosen):
                emitted[i] = [tok]
        for i, (r, rr) in enumerate(zip(reqs, rows)):
            if rr.num_sample and r.num_draft_tokens:
                faults.hit("verify", r.req_id)
                emitted[i], accepted[i] = self._verify(r, logits[rr.sample])
        need_lp = any(r.params.logprobs is not None for r in reqs) or any(rr.num_prompt for rr in rows)
        lp_all = torch.log_softmax(logits, dim=-1) if need_lp else None
        logprobs, prompt_lps = [], []
        for i, (r, rr) in enumerate(zip(reqs, rows)):
            lps = None
            if emitted[i] and r.params.logprobs is not None:
                n = len(emitted[i])  # the j-th emitted token was drawn at the j-th sampling row
                chosen = torch.tensor(emitted[i], dtype=torch.long, device=logits.device)
                lps = token_logprobs(lp_all[rr.sample_start:rr.sample_start + n], chosen, [r.params.logprobs] * n)
            logprobs.append(lps)
            if rr.num_prompt:
                faults.hit("prompt_logprobs", r.req_id)
            prompt_lps.append(self._prompt_logprobs(r, lp_all[rr.prompt]) if rr.num_prompt else None)
        return RunnerOutput(emitted, logprobs, prompt_lps, [r.num_draft_tokens for r in reqs], accepted)

    def _constrain(self, logits: torch.Tensor, reqs: list[ScheduledRequest]) -> None:
        """Mask, in place, the logits rows of constrained requests to the tokens their grammar allows next
        (before penalties and temperature, so those keep their meaning among the allowed tokens)."""
        idx = [j for j, r in enumerate(reqs) if r.grammar is not None]
        if not idx:
            return
        t0 = time.perf_counter()
        early = self._early_result()
        if all(reqs[j].req_id in early[0] for j in idx):
            bitmask = early[1][[early[0][reqs[j].req_id] for j in idx]]
        else:
            bitmask = self.fill_masks([reqs[j].grammar for j in idx])
        sub = logits[idx]
        self.grammars.apply_bitmask(sub, bitmask)
        self._check_alive(sub, [reqs[j] for j in idx], [_output_end(reqs[j]) for j in idx])
        logits[idx] = sub
        self.mask_seconds += time.perf_counter() - t0

    def _early_result(self) -> tuple[dict[str, int], torch.Tensor | None]:
        """The masks filled during the forward; none if that failed (each request then fills its own, so a
        failure is pinned on the request at fault)."""
        if self._early_masks is None or self._early_masks.exception() is not None:
            return {}, None
        return self._early_masks.result()

    def _constrain_drafted(self, logits: torch.Tensor, r: ScheduledRequest, drafts: list[int]) -> torch.Tensor:
        """r's k + 1 verification rows, masked: row j to what the grammar allows after drafts[:j]."""
        t0 = time.perf_counter()
        bitmask = self.grammars.allocate_bitmask(len(drafts) + 1)
        r.grammar.fill_bitmasks(bitmask, 0, drafts)
        logits = logits.clone()
        self.grammars.apply_bitmask(logits, bitmask)
        end = _output_end(r)
        self._check_alive(logits, [r] * (len(drafts) + 1), [end + j for j in range(len(drafts) + 1)])
        self.mask_seconds += time.perf_counter() - t0
        return logits

    def _check_alive(self, masked: torch.Tensor, reqs: list[ScheduledRequest], ends: list[int]) -> None:
        """Raise if a masked row allows nothing (counting the sampler's EOS ban before min_tokens); row i is
        reqs[i]'s output position ends[i]."""
        allowed = torch.isfinite(masked)
        early = [i for i, (r, end) in enumerate(zip(reqs, ends)) if end - r.prompt_len < r.params.min_tokens]
        if early and self.eos_ids:
            allowed[torch.tensor(early).unsqueeze(1), torch.tensor(list(self.eos_ids)).unsqueeze(0)] = False
        dead = (~allowed.any(-1)).nonzero()
        if len(dead):  # picking each request alone pins the error on this one
            r = reqs[int(dead[0])]
            raise RuntimeError(f"the grammar allows no next token for {r.req_id} (min_tokens "
                               f"{r.params.min_tokens} may not fit the grammar)")

    def _verify(self, r: ScheduledRequest, logits: torch.Tensor) -> tuple[list[int], int]:
        """Check r's draft tokens against the target logits at their k + 1 positions (sample/rejection.py).

        Seeded requests verify by coupling: each position's token is what `sample` draws there without
        drafts (the same processing, the position's own noise), so their text does not depend on drafting.
        """
        k = r.num_draft_tokens
        drafts = r.token_ids[-k:]
        if r.grammar is not None:
            logits = self._constrain_drafted(logits, r, drafts)
        rows = [self._sampling_row(r, drafts[:j]) for j in range(k + 1)]
        if any(row.params.uses_penalties or row.params.min_tokens for row in rows):
            logits = apply_penalties(logits.clone(), rows)
        if r.params.greedy:
            return verify_greedy(argmax_rows(logits).tolist(), drafts)
        probs = processed_probs(logits, rows)
        if r.params.seed is not None:
            return verify_coupled(probs, drafts, exponential_noise(probs.shape, rows, logits.device))
        return rejection_sample(probs, drafts, r.draft_probs)

    def _prompt_logprobs(self, r: ScheduledRequest, lp: torch.Tensor) -> list[TokenLogprobs]:
        """Logprobs of the prompt tokens following each of this chunk's positions."""
        nxt = r.all_token_ids[r.start_pos + 1:r.start_pos + 1 + lp.shape[0]]
        chosen = torch.tensor(nxt, dtype=torch.long, device=lp.device)
        return token_logprobs(lp, chosen, [r.params.prompt_logprobs] * lp.shape[0])

    def _generator(self, r: ScheduledRequest, position: int) -> torch.Generator | None:
        """A seeded request's generator for its output token `position`: reseeded from (seed, position)
        alone, not carried from step to step, so that neither the batch, nor drafts and their
        verification, nor preemption change what the request draws."""
        if r.params.seed is None or r.params.greedy:
            return None
        return position_generator(r.params.seed, position, self.device)

    def _sampling_row(self, r: ScheduledRequest, extra: list[int] | None = None) -> SamplingRow:
        """Sampling state at r's first sampled position (plus `extra` drafts already accepted before it)."""
        outputs = TokenSpan(r.all_token_ids, r.prompt_len, _output_end(r), extra or ())
        return SamplingRow(r.params, self._generator(r, len(outputs)), TokenSpan(r.all_token_ids, 0, r.prompt_len),
                           outputs, self.eos_ids)


def _rows_of(logits: torch.Tensor, rows: list[int], masked: bool) -> torch.Tensor:
    """logits[rows] for sampling: logits itself where the rows are all of them in order and no grammar will
    mask them in place (the logprobs are taken from the unmasked logits afterwards). At batch 1 the copy read
    the head's freshly written row a second time, half of it from the other core: 0.16 ms of a SmolLM2 step
    (10.3 ms, Xeon)."""
    if not masked and rows == list(range(logits.shape[0])):
        return logits
    return logits[rows]


def _output_end(r: ScheduledRequest) -> int:
    """Position of r's first sampled token (its known tokens, drafts excluded)."""
    return r.start_pos + r.num_tokens - r.num_draft_tokens
