"""`tuneserve bench families`: output tok/s of every model family, tuneserve against HF transformers.

Each family is built with random weights at one scale (bench/family_models.py: hidden 1024, 24 layers,
about 0.4B parameters; MoE families more, fewer active) and saved as an fp32 HF directory. Both systems
decode the same prompts in this process, on the same torch threads, in fp32: tuneserve's offline LLM
(quantization none) and HF transformers' `generate`, each warmed up once. Both stay loaded, so each batch
runs on one right after the other and a shared machine disturbs both alike (--repeats N keeps each
system's fastest of N runs). A batch is `b` random prompts of one length, all started together (so HF
needs no padding), each decoding exactly --output-len tokens greedily: EOS is banned until then on both
sides (HF's min_new_tokens, our min_tokens), so both pick from the same logits. output tok/s =
b * output-len / the wall time of the whole batch, prefill included. `same_tokens` is the share of
requests whose tokens equal HF's: the figures compare like for like when it is 1 (a near-tie of random
logits may flip a late token).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneserve.bench.family_models import FAMILIES, BuiltFamily, Shape, build_family_model
from tuneserve.bench.offline import warm_up
from tuneserve.bench.peers.hf import greedy_generate
from tuneserve.bench.records import table, torch_threads, write_json
from tuneserve.kernels.config import cpu_name
from tuneserve.sampling_params import SamplingParams

COLUMNS = ["family", "params", "active", "batch", "prompt", "hf_attn", "tuneserve_tok_s", "hf_tok_s", "ratio",
           "same_tokens"]
Batches = dict[int, list[list[int]]]  # batch size -> its prompts (token ids)


def make_prompts(batches: list[int], prompt_lens: list[int], vocab: int, seed: int = 0) -> Batches:
    """For each batch size, that many random prompts of its length (ids past the three specials)."""
    rng = random.Random(seed)
    return {b: [[rng.randrange(3, vocab) for _ in range(n)] for _ in range(b)] for b, n in zip(batches, prompt_lens)}


Runner = Callable[[list[list[int]]], list[list[int]]]  # prompts -> each one's new tokens


def tuneserve_runner(path: Path, prompts: Batches, output_len: int) -> Runner:
    """tuneserve's offline LLM (fp32, no quantization) on path, warmed up, as a Runner."""
    from tuneserve.llm import LLM

    longest = max(len(p) for ps in prompts.values() for p in ps)
    llm = LLM(str(path), quantization="none", dtype="float32", max_num_seqs=max(prompts),
              max_model_len=max(longest + output_len, 128))  # 128: room for warm_up's prompts
    warm_up(llm)
    params = SamplingParams(temperature=0, max_tokens=output_len, min_tokens=output_len)  # EOS banned, as HF's
    return lambda ps: [list(r.outputs[0].token_ids) for r in llm.generate(ps, params, use_tqdm=False)]


def hf_runner(path: Path, output_len: int) -> tuple[str, Runner]:
    """(its attention implementation, a Runner) of HF transformers' `generate` (fp32) on path, warmed up."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # the peers' greedy generate: pad and EOS (banned until output_len) from the generation config, which
    # family_models fills with PAD and EOS; one length per batch, so the left padding is none
    generate = greedy_generate(model)
    generate([[1] * 64], 4)  # warm-up, as tuneserve's
    return model.config._attn_implementation, lambda ps: generate(ps, output_len).tolist()


def best_of(run: Runner, prompts: list[list[int]], repeats: int) -> tuple[float, list[list[int]]]:
    """(the fastest of `repeats` runs in seconds, the tokens): the least disturbed run of a shared machine."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = run(prompts)
        times.append(time.perf_counter() - t0)
    return min(times), tokens


def family_rows(built: BuiltFamily, prompts: Batches, output_len: int, repeats: int = 1) -> list[dict[str, Any]]:
    """One row per batch size: both systems' output tok/s, their ratio, and how many requests agree. Both
    models stay loaded and each batch runs on one right after the other, so both see the machine alike."""
    ours = tuneserve_runner(built.path, prompts, output_len)
    attn, theirs = hf_runner(built.path, output_len)
    rows = []
    for b, ps in prompts.items():
        (t_ours, tok_ours), (t_hf, tok_hf) = best_of(ours, ps, repeats), best_of(theirs, ps, repeats)
        for tokens in (tok_ours, tok_hf):
            if any(len(t) != output_len for t in tokens):
                raise RuntimeError(f"{built.family} batch {b}: outputs of {sorted({len(t) for t in tokens})} tokens, "
                                   f"not {output_len}")
        ts, hf = b * output_len / t_ours, b * output_len / t_hf
        rows.append({"family": built.family, "params": built.params, "active_params": built.active_params,
                     "batch": b, "prompt_len": len(ps[0]), "output_len": output_len, "hf_attn": attn,
                     "tuneserve_s": t_ours, "hf_s": t_hf, "tuneserve_tok_s": ts, "hf_tok_s": hf, "ratio": ts / hf,
                     "same_tokens": sum(a == h for a, h in zip(tok_ours, tok_hf)) / b,
                     "tuneserve_tokens": tok_ours, "hf_tokens": tok_hf})
    return rows


def measure(families: list[str], shape: Shape, prompts: Batches, output_len: int, seed: int = 0,
            repeats: int = 1) -> list[dict]:
    """Build, measure and delete each family's model in turn (one checkpoint on disk at a time)."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tuneserve-families-") as root:
        for family in families:
            path = Path(root) / family
            built = build_family_model(family, path, shape, seed)
            gc.collect()
            new = family_rows(built, prompts, output_len, repeats)
            gc.collect()
            shutil.rmtree(path)
            print(table(_display(new), COLUMNS), flush=True)  # as each finishes: a long run shows progress
            rows += new
    return rows


def _display(rows: list[dict]) -> list[dict]:
    """Table cells: parameters in millions, the ratio with two decimals."""
    def millions(n: int) -> str:
        return f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"

    return [{**r, "params": millions(r["params"]), "active": millions(r["active_params"]),
             "prompt": r["prompt_len"], "ratio": f"{r['ratio']:.2f}", "same_tokens": f"{r['same_tokens']:.2f}"}
            for r in rows]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(ns: argparse.Namespace) -> int:
    import transformers

    families = [f.strip() for f in ns.families.split(",") if f.strip()]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    batches, lens = _ints(ns.batch), _ints(ns.prompt_len)
    lens = lens * len(batches) if len(lens) == 1 else lens
    if len(lens) != len(batches):
        raise ValueError(f"--prompt-len gives {len(lens)} lengths for {len(batches)} batch sizes")
    if ns.repeats < 1 or ns.output_len < 1 or min(batches + lens, default=0) < 1:
        raise ValueError("--repeats, --output-len, --batch and --prompt-len must be at least 1")
    shape = Shape(ns.hidden_size, ns.layers, ns.vocab_size)
    prompts = make_prompts(batches, lens, shape.vocab, ns.seed)
    with torch_threads(ns.threads) as threads:
        rows = measure(families, shape, prompts, ns.output_len, ns.seed, ns.repeats)
    title = (f"bench families: output tok/s, tuneserve vs HF transformers {transformers.__version__}, greedy, "
             f"{ns.output_len} new tokens, fp32, random weights (hidden {shape.hidden}, {shape.layers} layers, "
             f"vocab {shape.vocab}); {threads} torch thread{'s' * (threads != 1)} each; CPU: {cpu_name()}")
    print(table(_display(rows), COLUMNS, title=title))
    write_json(ns.json, {"command": " ".join(sys.argv), "cpu": cpu_name(), "threads": threads,
                         "hf_version": transformers.__version__, "shape": dataclasses.asdict(shape), "results": rows})
    return 0


def add_parser(sub: Any) -> None:  # noqa: ANN401 - argparse's private subparsers type
    p = sub.add_parser("families", help="output tok/s of every model family (random weights) vs HF transformers")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma list (default all: {','.join(FAMILIES)})")
    p.add_argument("--batch", default="1,32", help="batch sizes, comma list")
    p.add_argument("--prompt-len", default="64", help="prompt tokens: one for every batch, or one per batch size")
    p.add_argument("--output-len", type=int, default=32, help="new tokens per request")
    p.add_argument("--hidden-size", type=int, default=Shape.hidden)
    p.add_argument("--layers", type=int, default=Shape.layers)
    p.add_argument("--vocab-size", type=int, default=Shape.vocab)
    p.add_argument("--threads", type=int, default=None, help="torch threads of both systems (default: torch's count)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each batch per system; the fastest counts")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the prompts")
    p.add_argument("--json", default=None, help="write the figures (and every request's tokens) here")
    p.set_defaults(bench_main=main)
