"""Draft-model drafting: a smaller model with the same tokenizer proposes k tokens per request.

The draft model runs through its own ModelRunner with its own paged KV cache. For each request it keeps
the tokens whose KV it holds ("fed"); every round it rolls that back to the prefix the target kept
(rejected drafts are dropped), catches up on the new tokens in one ragged forward, then drafts k tokens
with k - 1 more batched forwards. Greedy requests draft the argmax. Seeded sampled requests draft the token
the target's sampler would draw from the draft's distribution: the same processing (penalties included) and
the same noise of the output position (argmax q / E), so that where q is close to p the draft is the
target's own choice and coupled verification accepts it. Unseeded ones draw from the draft's processed
distribution q, which is kept for rejection sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from tuneserve.config import EngineConfig, SpecConfig
from tuneserve.core.kv_layout import kv_groups
from tuneserve.core.kv_manager import KVManager
from tuneserve.core.request import Request
from tuneserve.core.step_io import ScheduledRequest
from tuneserve.engine_args import EngineArgs
from tuneserve.kernels.config import resolve as resolve_kernels
from tuneserve.loading import load_model
from tuneserve.log import log
from tuneserve.sample.sampler import SamplingRow, TokenSpan, position_generator, processed_probs, sample
from tuneserve.tokenizer import load_tokenizer
from tuneserve.worker.kv_cache import build_kv, plan_blocks
from tuneserve.worker.model_runner import ModelRunner


@dataclass
class _DraftState:
    shadow: Request  # the draft's view of the request (its num_computed_tokens is the draft's)
    fed: list[int] = field(default_factory=list)  # tokens whose KV the draft cache holds


def check_same_tokenizer(target_tok, draft_tok, draft_name: str) -> None:  # noqa: ANN001
    """Drafts are token ids: both models must map text to the same ids."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise ValueError(f"draft model {draft_name!r} has a different tokenizer from the target model "
                         f"({len(draft_tok.get_vocab())} vs {len(target_tok.get_vocab())} entries or different "
                         "ids); choose a draft model of the same family")


def draft_engine_config(spec: SpecConfig, target: EngineConfig) -> EngineConfig:
    """The draft model's configuration: the target's dtype, context, block size and device."""
    if not spec.model and not spec.quantization:
        raise ValueError('speculative_config with method "draft" needs "model" (the draft model) or '
                         '"quantization" (draft with a quantized copy of the target)')
    args = EngineArgs(model=spec.model or target.model.path, dtype=target.model.dtype,
                      max_model_len=target.model.max_model_len, block_size=target.cache.block_size,
                      enable_prefix_caching=False, kv_cache_memory_bytes=target.cache.kv_cache_memory_bytes,
                      device=target.device, kernels=target.model.kernels,
                      quant_activations=target.model.quant_activations,
                      prompt_attention=target.model.prompt_attention)
    config = args.create_engine_config()
    if len(kv_groups(config)) != 1:
        raise ValueError("a draft model with sliding-window layers is not supported; pick a full-attention one")
    return config


class DraftProposer:
    """Runs the draft model for the requests that speculate this step."""

    def __init__(self, spec: SpecConfig, config: EngineConfig, kv_memory: int, target_tokenizer) -> None:  # noqa: ANN001
        """`config` from draft_engine_config; `kv_memory` the draft's share of the KV budget."""
        self.config = config
        draft_name = spec.model or config.model.path
        check_same_tokenizer(target_tokenizer, load_tokenizer(config.model.path), draft_name)
        t0 = time.perf_counter()
        m = config.model
        model = load_model(m.path, m.arch, torch.device(config.device), m.dtype, quantization=spec.quantization,
                           kernels=resolve_kernels(m.kernels, m.quant_activations, m.prompt_attention))
        groups = kv_groups(config)
        num_blocks = plan_blocks(config, groups, kv_memory, label="draft KV cache")
        self.kv = KVManager(groups, num_blocks, config.cache.block_size, enable_caching=False)
        self.runner = ModelRunner(config, model, build_kv(config, groups, num_blocks))
        self.states: dict[str, _DraftState] = {}
        log(f"draft model {draft_name} ({spec.quantization or config.model.dtype}) loaded in "
            f"{time.perf_counter() - t0:.1f}s")

    def release_except(self, live_ids: set[str]) -> None:
        """Free the draft KV of requests that are no longer running (finished, aborted, preempted)."""
        for rid in [r for r in self.states if r not in live_ids]:
            self.kv.free(self.states.pop(rid).shadow)

    @torch.inference_mode()
    def propose(self, reqs: list[Request], ks: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """Drafts (and their distributions, None for greedy and seeded requests) for each request."""
        out: list[tuple[list[int], torch.Tensor | None]] = [([], None)] * len(reqs)
        active = [i for i, (r, k) in enumerate(zip(reqs, ks)) if k > 0 and self._prepare(r, k)]
        if not active:
            return out
        drafts: dict[int, list[int]] = {i: [] for i in active}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i in active}
        # round 0: catch up on the tokens the draft has not seen; later rounds feed the last draft
        feed = {i: reqs[i].all_token_ids[len(self.states[reqs[i].request_id].fed):] for i in active}
        ended: set[int] = set()  # constrained requests whose draft reached EOS
        try:
            for step in range(max(ks[i] for i in active)):
                batch = [i for i in active if ks[i] > step and i not in ended]
                if not batch:
                    break
                logits = self._forward(reqs, batch, feed)
                for row, i in enumerate(batch):
                    tok, q = self._draw(reqs[i], logits[row], drafts[i])
                    drafts[i].append(tok)
                    if q is not None:
                        probs[i].append(q)
                    feed[i] = [tok]
                    if reqs[i].grammar is not None:  # the next draft follows the grammar from here
                        if tok in self.runner.eos_ids or not reqs[i].grammar.accept([tok]):
                            ended.add(i)
        finally:  # the matchers go back to where the target is
            for i in active:
                if reqs[i].grammar is not None:
                    reqs[i].grammar.rollback(len(drafts[i]) - (i in ended))
        for i in active:
            p = torch.stack(probs[i]) if probs[i] else None
            out[i] = (drafts[i], p)
        return out

    def _prepare(self, r: Request, k: int) -> bool:
        """Roll the draft's state back to what the target kept and reserve KV for k more tokens."""
        st = self.states.get(r.request_id)
        if st is None:
            st = self.states[r.request_id] = _DraftState(Request(r.request_id, r.prompt_token_ids, r.params))
        valid = 0
        limit = min(len(st.fed), r.num_tokens - 1)
        while valid < limit and st.fed[valid] == r.all_token_ids[valid]:
            valid += 1
        st.fed = st.fed[:valid]
        st.shadow.num_computed_tokens = valid
        held = self.kv.block_ids(st.shadow)[0]
        need = r.num_tokens + k - 1  # KV positions the draft writes this round
        return len(held) * self.kv.block_size >= need or self.kv.allocate_slots(st.shadow, need - valid)

    def _forward(self, reqs: list[Request], batch: list[int], feed: dict[int, list[int]]) -> torch.Tensor:
        scheduled = []
        for i in batch:
            st = self.states[reqs[i].request_id]
            toks = feed[i]
            scheduled.append(ScheduledRequest(reqs[i].request_id, toks, len(st.fed), self.kv.block_ids(st.shadow),
                                              reqs[i].params, sample=True))
            st.fed.extend(toks)
        ctx, ids = self.runner.prepare_inputs(scheduled)
        hidden = self.runner.model(ids, ctx)
        last = torch.tensor([c - 1 for c in accumulate(s.num_tokens for s in scheduled)], device=hidden.device)
        return self.runner.model.compute_logits(hidden[last])

    def _draw(self, r: Request, logits: torch.Tensor, drafted: list[int]) -> tuple[int, torch.Tensor | None]:
        """The next draft after `drafted`, and the distribution it was drawn from (for rejection sampling);
        a constrained request's among what its grammar allows (its matcher has taken `drafted`)."""
        if r.grammar is not None:
            logits = logits.unsqueeze(0).clone()
            self.runner.grammars.apply_bitmask(logits, self.runner.fill_masks([r.grammar]))
            logits = logits[0]
        if r.params.greedy:
            return int(logits.argmax()), None
        if r.params.seed is not None:  # as the target's sampler draws at this output position
            outputs = TokenSpan(r.all_token_ids, r.num_prompt_tokens, r.num_tokens, drafted)
            gen = position_generator(r.params.seed, len(outputs), self.runner.device)
            prompt = TokenSpan(r.all_token_ids, 0, r.num_prompt_tokens)
            row = SamplingRow(r.params, gen, prompt, outputs, self.runner.eos_ids)
            return int(sample(logits.unsqueeze(0), [row])[0]), None
        q = processed_probs(logits.unsqueeze(0), [SamplingRow(r.params, None, [], [])])[0]
        return int(torch.multinomial(q, 1)), q

