"""ModelRunner: turns a SchedulerOutput into one forward pass over a ragged batch, then samples.

It owns the model and the paged KV cache tensors; a seeded request's randomness is a function of its seed
and output position (sample.position_generator), so the runner keeps no per-request state. Everything it
knows about requests comes from the SchedulerOutput; everything it returns goes in a RunnerOutput.
"""

from __future__ import annotations

import time

import torch

from tuneserve import faults
from tuneserve.config import EngineConfig
from tuneserve.core.kv_layout import KVGroupSpec
from tuneserve.core.step_io import RunnerOutput, ScheduledRequest, SchedulerOutput, TokenLogprobs, scatter_output
from tuneserve.dtypes import torch_dtype
from tuneserve.errors import RequestError
from tuneserve.kernels.attention import build_metadata
from tuneserve.models.layers import ForwardContext
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


class ModelRunner:
    """Runs the model for the scheduler's batches; holds the KV cache."""

    def __init__(self, config: EngineConfig, model: torch.nn.Module, groups: list[KVGroupSpec],
                 num_blocks: list[int]) -> None:
        self.config = config
        self.model = model
        self.device = torch.device(config.device)
        self.groups = groups
        self.block_size = config.cache.block_size
        self.dtype = torch_dtype(config.model.dtype)
        arch = config.model.arch
        self.eos_ids = arch.eos_token_ids
        self.layer_group = [0] * arch.num_layers
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [None] * arch.num_layers  # type: ignore[list-item]
        for g, spec in enumerate(groups):
            shape = (len(spec.layers), 2, num_blocks[g], self.block_size, arch.num_kv_heads, arch.head_dim)
            # zeros, not empty: padded reads of never-written slots must be finite
            cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            for j, layer in enumerate(spec.layers):
                self.kv_caches[layer] = (cache[j, 0], cache[j, 1])
                self.layer_group[layer] = g

    # ----- one step -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run the scheduled tokens through the model and sample where the requests need it."""
        reqs = sched.requests
        if not reqs:
            return RunnerOutput([], [], [])
        errors = self._check_requests(reqs)
        live = [i for i in range(len(reqs)) if i not in errors]
        out = RunnerOutput([], [], [])
        if live:
            run = [reqs[i] for i in live]
            ctx, input_ids = self._prepare(run)
            faults.hit("forward")
            hidden = self.model(input_ids, ctx)  # (N, hidden): an exception here fails the whole step
            out = self._sample(run, hidden)
        return scatter_output(out, live, len(reqs), errors) if errors else out

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
        ctx, ids = self._prepare(reqs)
        self.model.compute_logits(self.model(ids, ctx))
        return time.perf_counter() - t0

    def _prepare(self, reqs: list[ScheduledRequest]) -> tuple[ForwardContext, torch.Tensor]:
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
        ctx = ForwardContext(pos, [metas[g] for g in self.layer_group], self.kv_caches)
        return ctx, torch.tensor(ids, dtype=torch.long, device=self.device)

    def _sample(self, reqs: list[ScheduledRequest], hidden: torch.Tensor) -> RunnerOutput:
        # Which hidden rows need logits: each sampling request's last 1 + num_draft rows, and every row
        # of a chunk whose request wants prompt logprobs.
        rows: list[int] = []
        spans: list[tuple[int, int, int, int]] = []  # per request: (prompt rows start, end, sample start, end)
        row = 0
        for r in reqs:
            p_start = len(rows)
            if r.params.prompt_logprobs is not None and r.start_pos < r.prompt_len - 1:
                n_prompt = min(r.num_tokens, r.prompt_len - 1 - r.start_pos)
                rows.extend(range(row, row + n_prompt))
            p_end = s_start = len(rows)
            if r.sample:
                rows.extend(range(row + r.num_tokens - 1 - r.num_draft_tokens, row + r.num_tokens))
            spans.append((p_start, p_end, s_start, len(rows)))
            row += r.num_tokens
        if not rows:
            n = len(reqs)
            return RunnerOutput([[] for _ in reqs], [None] * n, [None] * n, [0] * n, [0] * n)
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])  # (R, V) fp32
        try:
            return self._pick_tokens(reqs, spans, logits)
        except Exception:  # noqa: BLE001 - pinned below by picking each request's tokens alone
            return self._pick_each(reqs, spans, logits)

    def _pick_each(self, reqs: list[ScheduledRequest], spans: list, logits: torch.Tensor) -> RunnerOutput:
        """Batched picking failed: pick each request's tokens on its own, so that the requests at fault
        end in error and the others get what a clean step gives them (greedy and seeded picks repeat)."""
        parts, errors = [], {}
        for i, (r, (p0, _, _, s1)) in enumerate(zip(reqs, spans)):
            own = [tuple(x - p0 for x in spans[i])]
            try:
                parts.append(self._pick_tokens([r], own, logits[p0:s1]))
            except Exception as e:  # noqa: BLE001 - pinned to this request
                kind = "verify" if r.num_draft_tokens else "sample"
                errors[i] = RequestError.from_exception(e, kind)
                parts.append(RunnerOutput([[]], [None], [None], [0], [0]))
        out = RunnerOutput(*([x for p in parts for x in getattr(p, f)]
                             for f in ("sampled", "logprobs", "prompt_logprobs", "num_draft_tokens", "num_accepted")))
        out.errors = errors
        return out

    def _pick_tokens(self, reqs: list[ScheduledRequest], spans: list, logits: torch.Tensor) -> RunnerOutput:
        # requests without drafts: one row each, sampled together
        plain = [(i, s1 - 1) for i, (r, (_, _, s0, s1)) in enumerate(zip(reqs, spans))
                 if s1 > s0 and not r.num_draft_tokens]
        emitted: list[list[int]] = [[] for _ in reqs]
        accepted = [0] * len(reqs)
        if plain:
            for i, _ in plain:
                faults.hit("sample", reqs[i].req_id)
            rows = [self._sampling_row(reqs[i]) for i, _ in plain]
            chosen = sample(logits[[row for _, row in plain]], rows).tolist()
            for (i, _), tok in zip(plain, chosen):
                emitted[i] = [tok]
        for i, (r, (_, _, s0, s1)) in enumerate(zip(reqs, spans)):
            if s1 > s0 and r.num_draft_tokens:
                faults.hit("verify", r.req_id)
                emitted[i], accepted[i] = self._verify(r, logits[s0:s1])
        need_lp = any(r.params.logprobs is not None for r in reqs) or any(p1 > p0 for p0, p1, _, _ in spans)
        lp_all = torch.log_softmax(logits, dim=-1) if need_lp else None
        logprobs, prompt_lps = [], []
        for i, (r, (p0, p1, s0, _)) in enumerate(zip(reqs, spans)):
            lps = None
            if emitted[i] and r.params.logprobs is not None:
                n = len(emitted[i])  # the j-th emitted token was drawn at row s0 + j
                chosen = torch.tensor(emitted[i], dtype=torch.long, device=logits.device)
                lps = token_logprobs(lp_all[s0:s0 + n], chosen, [r.params.logprobs] * n)
            logprobs.append(lps)
            if p1 > p0:
                faults.hit("prompt_logprobs", r.req_id)
            prompt_lps.append(self._prompt_logprobs(r, lp_all[p0:p1]) if p1 > p0 else None)
        return RunnerOutput(emitted, logprobs, prompt_lps, [r.num_draft_tokens for r in reqs], accepted)

    def _verify(self, r: ScheduledRequest, logits: torch.Tensor) -> tuple[list[int], int]:
        """Check r's draft tokens against the target logits at their k + 1 positions (sample/rejection.py).

        Seeded requests verify by coupling: each position's token is what `sample` draws there without
        drafts (the same processing, the position's own noise), so their text does not depend on drafting.
        """
        k = r.num_draft_tokens
        drafts = r.token_ids[-k:]
        rows = [self._sampling_row(r, drafts[:j]) for j in range(k + 1)]
        if any(row.params.uses_penalties or row.params.min_tokens for row in rows):
            logits = apply_penalties(logits.clone(), rows)
        if r.params.greedy:
            return verify_greedy(logits.argmax(-1).tolist(), drafts)
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
        end = r.start_pos + r.num_tokens - r.num_draft_tokens
        outputs = TokenSpan(r.all_token_ids, r.prompt_len, end, extra or ())
        return SamplingRow(r.params, self._generator(r, len(outputs)), TokenSpan(r.all_token_ids, 0, r.prompt_len),
                           outputs, self.eos_ids)
