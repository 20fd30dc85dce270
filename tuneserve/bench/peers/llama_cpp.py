"""llama.cpp (llama-cpp-python) as a performance peer: continuous batching, one llama_decode per step."""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from tuneserve.bench.peers.pp_tg import PpTgPlan, PpTgRow
from tuneserve.bench.peers.result import (
    PEERS_INSTALL_HINT,
    PeerResult,
    check_workload,
    make_result,
    mean,
    peer_threads,
)


def is_available() -> bool:
    """Tell whether llama-cpp-python (`llama_cpp`) can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


_LOG_CALLBACK: Any = None  # keeps the ctypes log callback alive while llama.cpp may call it


def _import_llama_cpp() -> Any:
    """Import llama_cpp, silence its logging, and initialise its backend once."""
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except Exception as exc:
        raise RuntimeError(PEERS_INSTALL_HINT) from exc
    if _LOG_CALLBACK is None:
        if hasattr(llama_cpp, "llama_log_callback") and hasattr(llama_cpp, "llama_log_set"):
            _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
            llama_cpp.llama_log_set(_LOG_CALLBACK, None)
        else:
            _LOG_CALLBACK = False
        llama_cpp.llama_backend_init()
    return llama_cpp


def _seq_remover(L: Any, ctx: Any) -> Any:
    """Return a function that drops one sequence's cached KV, for whichever API this llama.cpp has."""
    if hasattr(L, "llama_memory_seq_rm") and hasattr(L, "llama_get_memory"):
        mem = L.llama_get_memory(ctx)
        return lambda seq: L.llama_memory_seq_rm(mem, seq, -1, -1)
    for name in ("llama_kv_self_seq_rm", "llama_kv_cache_seq_rm"):
        if hasattr(L, name):
            fn = getattr(L, name)
            return lambda seq: fn(ctx, seq, -1, -1)
    raise RuntimeError("this llama_cpp has no sequence-removal API (llama_memory_seq_rm / kv_*_seq_rm)")


def _load_model(L: Any, gguf_path: str, extra_bufts: bool) -> Any:
    """The GGUF file loaded on the CPU (see run_llama_cpp for extra_bufts); raises where llama.cpp cannot."""
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    if hasattr(mparams, "use_extra_bufts"):
        mparams.use_extra_bufts = extra_bufts
    model = L.llama_model_load_from_file(os.fsencode(gguf_path), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf_path}")
    return model


def _fill(batch: Any, items: list[tuple[int, int, int, bool]]) -> None:
    """Put (token, position, sequence, logits?) items into a llama_batch."""
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, want_logits) in enumerate(items):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = want_logits


def _round_up(n: int, k: int) -> int:
    """Round n up to a multiple of k."""
    return -(-n // k) * k


def run_llama_cpp(
    gguf_path: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    n_parallel: Sequence[int] = (1, 8, 32, 64),
    n_threads: int | None = None,
    time_limit_s: float | None = None,
    kv_unified: bool = False,
    return_tokens: bool = False,
    extra_bufts: bool = False,
) -> list[PeerResult]:
    """Measure llama.cpp continuous batching (greedy, native GGUF weights), one result per n_parallel.

    `extra_bufts` enables llama.cpp's repacked CPU weight layouts (AMX, interleaved); it is off by default
    because with a GGML_NATIVE build on an AMX-capable host the AMX matmul faults (`ldtilecfg`) here.
    `n_threads` (decode and batch threads) defaults to the engine's thread count (`peer_threads`).
    """
    n_threads = peer_threads(n_threads)
    L = _import_llama_cpp()
    import numpy as np

    check_workload(prompts, max_new_tokens)
    t_load = time.perf_counter()
    model = _load_model(L, gguf_path, extra_bufts)
    load_s = time.perf_counter() - t_load
    try:
        vocab = L.llama_model_get_vocab(model)
        n_vocab = int(L.llama_vocab_n_tokens(vocab))
        bad = [t for p in prompts for t in p if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the model's vocabulary of {n_vocab}")
        version = getattr(L, "__version__", None)
        results = []
        for par in n_parallel:
            if par < 1:
                raise ValueError(f"n_parallel must be >= 1, got {par}")
            results.append(
                _llama_workload(
                    L,
                    np,
                    model,
                    n_vocab,
                    prompts,
                    max_new_tokens,
                    par,
                    n_threads,
                    time_limit_s,
                    kv_unified,
                    return_tokens,
                    {"load_s": load_s, "llama_cpp_version": version, "extra_bufts": extra_bufts},
                )
            )
        return results
    finally:
        L.llama_model_free(model)


def _llama_workload(
    L: Any,
    np: Any,
    model: Any,
    n_vocab: int,
    prompts: list[list[int]],
    max_new_tokens: int,
    par: int,
    n_threads: int,
    time_limit_s: float | None,
    kv_unified: bool,
    return_tokens: bool,
    extra: dict[str, Any],
) -> PeerResult:
    """Run the whole workload on a fresh context with at most `par` sequences in flight."""
    slots = min(par, len(prompts))
    longest_seq = max(len(p) for p in prompts) + max_new_tokens
    longest_prompts = sorted((len(p) for p in prompts), reverse=True)[:slots]
    max_batch_tokens = max(sum(longest_prompts), slots) + slots  # a call holding every prompt at once
    cparams = L.llama_context_default_params()
    # Non-unified KV splits n_ctx evenly between the sequences; unified KV shares it, so size both for
    # `slots` sequences of the longest length. llama.cpp pads n_ctx to a multiple of 256 itself.
    cparams.n_ctx = slots * _round_up(longest_seq, 256)
    cparams.n_batch = max_batch_tokens
    cparams.n_ubatch = min(512, max_batch_tokens)
    cparams.n_seq_max = slots
    cparams.n_threads = n_threads
    cparams.n_threads_batch = n_threads
    if hasattr(cparams, "kv_unified"):
        cparams.kv_unified = kv_unified
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context for n_parallel={par}")
    n_ctx = int(L.llama_n_ctx(ctx))
    batch = L.llama_batch_init(max_batch_tokens, 0, 1)
    try:
        seq_rm = _seq_remover(L, ctx)

        def fill(items: list[tuple[int, int, int, bool]]) -> None:
            _fill(batch, items)

        def decode() -> None:
            rc = L.llama_decode(ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with code {rc} (n_parallel={par})")

        # Warm-up outside the clock: a short prompt and one decode step on sequence 0, then forget it.
        warm = prompts[0][: min(8, len(prompts[0]))]
        fill([(t, i, 0, i == len(warm) - 1) for i, t in enumerate(warm)])
        decode()
        fill([(warm[-1], len(warm), 0, True)])
        decode()
        seq_rm(0)

        queue = deque(range(len(prompts)))
        free = list(range(slots - 1, -1, -1))
        active: dict[int, list[int]] = {}  # seq -> [request, next position, last token, generated]
        first_t: dict[int, float] = {}
        admit_t: dict[int, float] = {}
        last_t: dict[int, float] = {}
        out_tok: dict[int, list[int]] = {}
        done: list[int] = []
        calls = 0
        t0 = time.perf_counter()
        while queue or active:
            items: list[tuple[int, int, int, bool]] = []
            order: list[tuple[int, int]] = []  # (seq, batch index of its logits row)
            for seq, (_req, pos, last, _gen) in active.items():
                order.append((seq, len(items)))
                items.append((last, pos, seq, True))
            admitting = calls == 0 or time_limit_s is None or time.perf_counter() - t0 <= time_limit_s
            now = time.perf_counter()
            while admitting and queue and free:
                req = queue.popleft()
                seq = free.pop()
                prompt = prompts[req]
                n = len(prompt)
                items.extend((t, i, seq, i == n - 1) for i, t in enumerate(prompt))
                order.append((seq, len(items) - 1))
                active[seq] = [req, n, -1, 0]
                admit_t[req] = now
            if not items:
                break  # time limit reached with nothing in flight
            fill(items)
            decode()
            calls += 1
            next_tokens = [
                int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
                for _seq, i in order
            ]
            now = time.perf_counter()
            for (seq, _i), tok in zip(order, next_tokens):
                state = active[seq]
                req = state[0]
                if state[3] == 0:
                    first_t[req] = now
                else:
                    state[1] += 1
                state[2] = tok
                state[3] += 1
                if return_tokens:
                    out_tok.setdefault(req, []).append(tok)
                if state[3] >= max_new_tokens:
                    last_t[req] = now
                    done.append(req)
                    del active[seq]
                    seq_rm(seq)
                    free.append(seq)
        elapsed = time.perf_counter() - t0
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)

    done.sort()
    ttfts = [first_t[r] - t0 for r in done]
    tpots = [(last_t[r] - first_t[r]) / (max_new_tokens - 1) for r in done if max_new_tokens > 1]
    extra = {
        **extra,
        "n_parallel": par,
        "n_threads": n_threads,
        "kv_unified": kv_unified,
        "n_ctx": n_ctx,
        "num_decode_calls": calls,
        "mean_ttft_after_admit_s": mean([first_t[r] - admit_t[r] for r in done]),
        "weights": "gguf-native",
    }
    if return_tokens:
        extra["tokens"] = [out_tok[r] for r in done]
        extra["request_ids"] = done
    return make_result(
        "llama.cpp",
        f"n_parallel={par}",
        [len(prompts[r]) for r in done],
        [max_new_tokens] * len(done),
        elapsed,
        ttfts,
        tpots,
        extra,
        threads=n_threads,
    )


def llama_pp_tg(gguf_path: str, plan: PpTgPlan, n_threads: int | None = None) -> list[PpTgRow]:
    """llama.cpp's pp and tg rows (bench/peers/pp_tg.py): native GGUF weights, one context per test."""
    n_threads = peer_threads(n_threads)
    L = _import_llama_cpp()
    import numpy as np

    model = _load_model(L, gguf_path, extra_bufts=False)  # as run_llama_cpp's default
    try:
        n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
        rows = []
        for test, b in plan.tests():
            row = PpTgRow("llama.cpp", test, b, n_threads)
            pp = test.startswith("pp")
            length = plan.pp_len if pp else plan.prompt_len
            with _Session(L, np, model, n_vocab, b, length + (0 if pp else plan.tg_len + 1), n_threads) as s:
                s.run([[100] * 8], 2)  # warm-up
                for rep in range(plan.reps):
                    prompts = plan.prompts(rep, b, length, n_vocab)
                    row.runs.append(s.pp(prompts[0]) if pp else s.tg(prompts, plan.tg_len))
            rows.append(row)
        return rows
    finally:
        L.llama_model_free(model)


class _Session:
    """One llama.cpp context for `slots` sequences of up to `seq_len` tokens."""

    def __init__(self, L: Any, np: Any, model: Any, n_vocab: int, slots: int, seq_len: int, n_threads: int) -> None:
        self.L, self.np, self.n_vocab, self.slots = L, np, n_vocab, slots
        cparams = L.llama_context_default_params()
        cparams.n_ctx = slots * _round_up(seq_len, 256)
        cparams.n_batch = self.cap = slots * seq_len
        cparams.n_ubatch = min(512, self.cap)
        cparams.n_seq_max = slots
        cparams.n_threads = cparams.n_threads_batch = n_threads
        self.ctx = L.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {slots} sequences")
        self.batch = L.llama_batch_init(self.cap, 0, 1)
        self.seq_rm = _seq_remover(L, self.ctx)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (token, position, sequence, logits?) items; the argmax of each logits row."""
        _fill(self.batch, items)
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")
        rows = [i for i, item in enumerate(items) if item[3]]
        return [int(self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                    .argmax()) for i in rows]

    def run(self, prompts: list[list[int]], new: int) -> tuple[list[int], float, float]:
        """Prefill every prompt in one call, then `new` - 1 decode steps; (last tokens, prefill seconds,
        decode seconds). The sequences are forgotten afterwards."""
        t0 = time.perf_counter()
        toks = self._decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        t1 = time.perf_counter()
        for step in range(new - 1):
            toks = self._decode([(tok, len(p) + step, s, True) for s, (p, tok) in enumerate(zip(prompts, toks))])
        t2 = time.perf_counter()
        for s in range(len(prompts)):
            self.seq_rm(s)
        return toks, t1 - t0, t2 - t1

    def pp(self, prompt: list[int]) -> float:
        return len(prompt) / self.run([prompt], 1)[1]

    def tg(self, prompts: list[list[int]], tg_len: int) -> float:
        return len(prompts) * tg_len / self.run(prompts, tg_len + 1)[2]
