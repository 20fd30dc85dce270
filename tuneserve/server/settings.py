"""The server's own settings: one dataclass, its `tuneserve serve` flags, and the README's table."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from tuneserve.server.limits import RequestLimits, add_limit_flags, limits_from_args
from tuneserve.tool_calls.registry import PARSERS


@dataclass
class ServerSettings:
    """How the server admits, bounds, guards and logs requests (README, Server)."""

    served_model_name: str | None = None
    api_key: str | None = None
    max_waiting_requests: int = 256  # sequences (n x prompts) waiting to run; past it, 503 + Retry-After
    max_request_bytes: int = 8 << 20
    max_header_bytes: int = 16 << 10  # request line + headers (uvicorn's h11 limit)
    max_request_seconds: float = 3600.0  # a generation (streaming or not) running longer ends with an error
    drain_timeout: float = 30.0
    metrics_require_api_key: bool = False  # /metrics behind the API key too
    trust_request_chat_template: bool = False  # render a request's own chat_template (sandboxed)
    tool_call_parser: str = "auto"  # the model's tool-call format: auto (from its template), none, or a name
    log_prompts: bool = False  # prompt text in the debug log (off: ids, sizes and errors only)
    exit_on_fatal: bool = True  # exit the process when the engine cannot recover (a supervisor restarts it)
    prepare_threads: int = 4  # threads that tokenize and render templates off the event loop
    limits: RequestLimits = field(default_factory=RequestLimits)


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The `tuneserve serve` flags of ServerSettings."""
    d = ServerSettings()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this bearer token on every route that runs the "
                   "model or shows text (or TUNESERVE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    p.add_argument("--max-waiting-requests", type=int, default=d.max_waiting_requests,
                   help="sequences (n x prompts) that may wait to run; more get 503 with Retry-After")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="request body limit (413)")
    p.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                   help="request line and headers limit (the connection is refused above it)")
    p.add_argument("--max-request-seconds", type=float, default=d.max_request_seconds,
                   help="a generation running longer ends with an error (504, or an error event in a stream)")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="seconds to finish requests on SIGTERM")
    p.add_argument("--metrics-require-api-key", action="store_true", help="guard /metrics with the API key too")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="render chat templates sent in requests (sandboxed, with time and size limits)")
    p.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=["auto", "none", *sorted(PARSERS)],
                   help="how tool calls are written: auto (the format the chat template writes), none (no tool "
                   "calling), or a parser name (hermes)")
    p.add_argument("--log-prompts", action="store_true", help="log prompt text at debug level (off by default)")
    p.add_argument("--log-level", default="info")
    add_limit_flags(p)


def settings_from_args(ns: argparse.Namespace) -> ServerSettings:
    return ServerSettings(served_model_name=ns.served_model_name,
                          api_key=ns.api_key or os.environ.get("TUNESERVE_API_KEY") or None,
                          max_waiting_requests=ns.max_waiting_requests, max_request_bytes=ns.max_request_bytes,
                          max_header_bytes=ns.max_header_bytes, max_request_seconds=ns.max_request_seconds,
                          drain_timeout=ns.drain_timeout, metrics_require_api_key=ns.metrics_require_api_key,
                          trust_request_chat_template=ns.trust_request_chat_template, log_prompts=ns.log_prompts,
                          tool_call_parser=ns.tool_call_parser,
                          limits=limits_from_args(ns))
