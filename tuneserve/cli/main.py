"""`tuneserve` command line: one sub-command per verb; engine arguments are --kebab-case flags."""

from __future__ import annotations

import argparse
import json
import sys

from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import SamplingParams
from tuneserve.server.settings import add_server_flags


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params_from(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=ns.max_tokens, temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k,
                          min_p=ns.min_p, presence_penalty=ns.presence_penalty,
                          frequency_penalty=ns.frequency_penalty, repetition_penalty=ns.repetition_penalty,
                          seed=ns.sampling_seed, stop=ns.stop, ignore_eos=ns.ignore_eos)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="built-in alias, GGUF file, HF model directory or hub id (default: smollm2-135m)")


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    """Engine arguments from flags (an omitted model means the default one)."""
    return EngineArgs.from_cli_args(ns)


# ----- verbs ------------------------------------------------------------------------------------
def cmd_pull(ns: argparse.Namespace) -> int:
    from tuneserve.weights.sources import ALIASES, pull

    if ns.list:
        for a in ALIASES.values():
            print(f"{a.name:20s} {a.size / 1e6:8.0f} MB  {a.description}")
        return 0
    for name in ns.aliases or ["smollm2-135m"]:
        print(pull(name, force=ns.force))
    return 0


def cmd_generate(ns: argparse.Namespace) -> int:
    from tuneserve.llm import LLM

    prompts = list(ns.prompt or [])
    if ns.prompts_file:
        with open(ns.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        prompts = [sys.stdin.read()]
    args = engine_args_from(ns)
    llm = LLM(**args.to_dict())
    outs = llm.generate(prompts, sampling_params_from(ns), use_tqdm=len(prompts) > 1)
    for o in outs:
        if ns.json:
            c = o.outputs[0]
            print(json.dumps({"prompt": o.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "metrics": o.metrics.to_dict()}))
        else:
            print(o.outputs[0].text)
            m = o.metrics
            print(f"--- {m.num_generated_tokens} tokens, ttft {m.ttft * 1000:.0f} ms, "
                  f"tpot {(m.tpot or 0) * 1000:.1f} ms, {o.outputs[0].finish_reason}", file=sys.stderr)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    from tuneserve.cli.chat import run_chat

    return run_chat(engine_args_from(ns), sampling_params_from(ns), ns.system)


def cmd_serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from tuneserve.server.app import build_app
    from tuneserve.server.settings import settings_from_args

    settings = settings_from_args(ns)
    app = build_app(engine_args_from(ns), settings)
    print(f"[tuneserve] serving on http://{ns.host}:{ns.port} (OpenAI API at /v1, docs at /docs); "
          "the model loads in the background, /health turns 200 when ready", file=sys.stderr)
    uvicorn.run(app, host=ns.host, port=ns.port, timeout_graceful_shutdown=int(ns.drain_timeout),
                log_level=ns.log_level, h11_max_incomplete_event_size=settings.max_header_bytes)
    return 0


# ----- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneserve", description="An LLM serving engine whose every "
                                     "trade-off is a measured knob.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    p = sub.add_parser("pull", help="fetch and verify built-in models into the cache")
    p.add_argument("aliases", nargs="*")
    p.add_argument("--list", action="store_true", help="list the built-in aliases")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("generate", help="generate text for prompts (offline)")
    add_model_arg(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: stdin")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_sampling_args(p)
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal, streamed")
    add_model_arg(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_tokens=512)
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_model_arg(p)
    add_server_flags(p)
    EngineArgs.add_cli_args(p, with_model=False)
    p.set_defaults(func=cmd_serve)

    from tuneserve.bench import report, sweep, tune
    from tuneserve.cli.bench import add_bench_parser

    add_bench_parser(sub)
    sweep.add_parser(sub)
    tune.add_parser(sub)
    report.add_parser(sub)
    from tuneserve.cli.quantize import add_parsers as add_quant_parsers

    add_quant_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return int(ns.func(ns) or 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
