"""HF transformers `generate` as a performance peer (fp32 dequantized GGUF, SDPA, left-padded batches)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from tuneserve.bench.peers.pp_tg import PpTgPlan, PpTgRow
from tuneserve.bench.peers.result import PeerResult, check_workload, make_result, mean, peer_threads
from tuneserve.bench.records import torch_threads

_clock = time.perf_counter  # a module attribute, so a test can stand in for it without touching `time`


class _StepClock:
    """A `generate` streamer that only records when the first and the last new tokens appear."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None
        self.last: float | None = None

    def put(self, value: Any) -> None:
        """Record the time of a put; the first put is the prompt, the later ones are new tokens."""
        now = _clock()
        self.puts += 1
        if self.puts == 2:
            self.first = now
        if self.puts >= 2:
            self.last = now

    def end(self) -> None:
        """Do nothing at the end of generation."""


def _load_hf(gguf_path: str) -> Any:
    """Load the GGUF into HF transformers as an fp32 (dequantized) model using SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    directory, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


def greedy_generate(model: Any) -> Any:
    """generate(batch, new, streamer=None) -> the new token ids (B, new): greedy, exactly `new` tokens each."""
    import torch

    gen_cfg = model.generation_config
    pad_id = gen_cfg.pad_token_id
    if pad_id is None:
        eos = gen_cfg.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id, use_cache=True)

    def generate(batch: Sequence[Sequence[int]], new: int, streamer: Any = None) -> Any:
        ids, mask = _pad_left(batch, pad_id)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new,  # suppresses EOS: every request yields exactly `new` tokens
                                 streamer=streamer, **greedy)
        return out[:, ids.shape[1]:]

    return generate


def hf_pp_tg(gguf_path: str, plan: PpTgPlan, threads: int | None = None) -> list[PpTgRow]:
    """HF transformers' pp and tg rows (bench/peers/pp_tg.py), fp32 dequantized weights, SDPA."""
    threads = peer_threads(threads)
    with torch_threads(threads):
        model = _load_hf(gguf_path)
        generate = greedy_generate(model)
        vocab = model.config.vocab_size
        generate([[100] * 8], 4)  # warm-up
        rows = []
        for test, b in plan.tests():
            row = PpTgRow("hf-transformers", test, b, threads)
            for rep in range(plan.reps):
                if test.startswith("pp"):
                    t0 = _clock()
                    generate(plan.prompts(rep, 1, plan.pp_len, vocab), 1)
                    row.runs.append(plan.pp_len / (_clock() - t0))
                else:
                    clock = _StepClock()
                    generate(plan.prompts(rep, b, plan.prompt_len, vocab), plan.tg_len + 1, clock)
                    row.runs.append(b * plan.tg_len / (clock.last - clock.first))
            rows.append(row)
        return rows


def _pad_left(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-pad token-id lists into (input_ids, attention_mask) tensors."""
    import torch

    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def run_hf(
    gguf_path: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_sizes: Sequence[int] = (1, 8, 32, 64),
    time_limit_s: float | None = None,
    return_tokens: bool = False,
    threads: int | None = None,
) -> list[PeerResult]:
    """Measure HF transformers `generate` (fp32, SDPA, left-padded static batches), one result per size,
    on `threads` torch threads (default: the engine's count, `peer_threads`)."""
    check_workload(prompts, max_new_tokens)
    with torch_threads(peer_threads(threads)):
        return _run_hf(gguf_path, prompts, max_new_tokens, batch_sizes, time_limit_s, return_tokens)


def _run_hf(
    gguf_path: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_sizes: Sequence[int],
    time_limit_s: float | None,
    return_tokens: bool,
) -> list[PeerResult]:
    import torch

    t_load = time.perf_counter()
    model = _load_hf(gguf_path)
    load_s = time.perf_counter() - t_load
    generate = greedy_generate(model)
    generate([prompts[0]], min(4, max_new_tokens))  # warm-up: first-call allocations and dispatch

    results = []
    for bs in batch_sizes:
        if bs < 1:
            raise ValueError(f"batch size must be >= 1, got {bs}")
        prompt_lens: list[int] = []
        out_lens: list[int] = []
        ttfts: list[float] = []
        tpots: list[float] = []
        prefill_s: list[float] = []
        tokens: list[list[int]] = []
        t0 = time.perf_counter()
        for start in range(0, len(prompts), bs):
            if start and time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                break
            batch = prompts[start : start + bs]
            clock = _StepClock()
            t_batch = time.perf_counter()
            new = generate(batch, max_new_tokens, clock)
            t_end = time.perf_counter()
            first = clock.first if clock.first is not None else t_end
            last = clock.last if clock.last is not None else t_end
            n_new = int(new.shape[1])
            for row, prompt in enumerate(batch):
                prompt_lens.append(len(prompt))
                out_lens.append(n_new)
                ttfts.append(first - t0)
                if n_new > 1:
                    tpots.append((last - first) / (n_new - 1))
                if return_tokens:
                    tokens.append(new[row].tolist())
            prefill_s.append(first - t_batch)
        elapsed = time.perf_counter() - t0
        extra: dict[str, Any] = {
            "batch_size": bs,
            "num_batches": len(prefill_s),
            "mean_batch_prefill_s": mean(prefill_s),
            "torch_threads": torch.get_num_threads(),
            "dtype": "float32",
            "attn": "sdpa",
            "load_s": load_s,
        }
        if return_tokens:
            extra["tokens"] = tokens
        results.append(
            make_result(
                "hf-transformers", f"batch={bs}", prompt_lens, out_lens, elapsed, ttfts, tpots, extra,
                threads=torch.get_num_threads(),
            )
        )
    return results


