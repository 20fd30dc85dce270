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
    if ns.replicas:
        return _serve_replicas(ns)
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


def _serve_replicas(ns: argparse.Namespace) -> int:
    """`serve --replicas N`: the same server as N engine replicas behind one ingress on a local Ray."""
    import dataclasses
    import os

    from tuneserve.server.settings import settings_from_args

    if not _have_ray("--replicas"):
        return 2
    from tuneserve.deploy.config import DeployConfig
    from tuneserve.deploy.local import serve_forever

    args = engine_args_from(ns).to_dict()
    settings = dataclasses.asdict(settings_from_args(ns))
    settings.pop("limits")  # the replicas keep the default request limits
    cpus = os.cpu_count() or 1
    threads = ns.replica_threads or max(1, cpus // ns.replicas)
    cfg = DeployConfig(model=args.pop("model"), engine_args=args, server=settings, num_replicas=ns.replicas,
                       torch_threads=threads, ray_actor_options={"num_cpus": threads},
                       max_ongoing_requests=ns.replica_max_ongoing, max_queued_requests=ns.replica_max_queued)
    return serve_forever(cfg, ns.host, ns.port, num_cpus=max(cpus, threads * ns.replicas))


def _have_ray(what: str) -> bool:
    """Whether Ray Serve is installed; if not, says how to install it."""
    from tuneserve.deploy import RAY_MISSING, require_ray

    try:
        require_ray()
        return True
    except ImportError:
        print(f"error: {what} needs Ray Serve: {RAY_MISSING.split(': ', 1)[1]}", file=sys.stderr)
        return False


def cmd_deploy(ns: argparse.Namespace) -> int:
    """`deploy ray --config FILE`: the replicated deployment on a Ray cluster (RAY_ADDRESS / --address)."""
    if not _have_ray("deploy ray"):
        return 2
    from tuneserve.deploy.config import DeployConfig
    from tuneserve.deploy.local import serve_forever

    return serve_forever(DeployConfig.from_file(ns.config), ns.host, ns.port, address=ns.address)


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
    g = p.add_argument_group("replicas (Ray Serve; pip install 'tuneserve[ray]')")
    g.add_argument("--replicas", type=int, default=0, help="run N engine replicas behind one ingress on a "
                   "local Ray cluster, routed by prefix affinity (default: one engine, no Ray)")
    g.add_argument("--replica-threads", type=int, default=None, help="torch threads per replica "
                   "(default: CPU cores / replicas)")
    g.add_argument("--replica-max-ongoing", type=int, default=16, help="requests one replica runs at once")
    g.add_argument("--replica-max-queued", type=int, default=64,
                   help="requests waiting for a replica; more get 503 with Retry-After")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("deploy", help="deploy replicas on a cluster")
    dsub = p.add_subparsers(dest="target", metavar="TARGET")
    d = dsub.add_parser("ray", help="N engine replicas behind one OpenAI-compatible ingress on Ray Serve")
    d.add_argument("--config", required=True, help="YAML or JSON deploy config (README: Replicas)")
    d.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local one)")
    d.add_argument("--host", default="0.0.0.0")
    d.add_argument("--port", type=int, default=8000)
    d.set_defaults(func=cmd_deploy)
    p.set_defaults(func=lambda ns: p.print_help() or 2)  # `deploy` alone; `deploy ray` sets its own

    import tuneserve.deploy.lab  # noqa: F401 - sweep and tune's replicas axis (Ray itself is imported on use)
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
