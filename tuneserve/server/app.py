"""FastAPI application: OpenAI-compatible routes, health, metrics, tokenizer endpoints, errors, limits."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import traceback
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import tuneserve
from tuneserve.engine.llm_engine import LLMEngine
from tuneserve.engine_args import EngineArgs
from tuneserve.sampling_params import ParamError
from tuneserve.server.async_engine import AsyncEngine, EngineBusyError, EngineDeadError, RequestFailedError
from tuneserve.server.metrics import ServerMetrics
from tuneserve.server.middleware import BodyLimit, HeaderLimit
from tuneserve.server.openai_serving import OpenAIServing, now, usage
from tuneserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    validation_error,
)
from tuneserve.server.schema import server_openapi
from tuneserve.server.settings import ServerSettings
from tuneserve.server.streaming import GuardedBody, chat_events, completion_events
from tuneserve.server.tools import chat_message
from tuneserve.tokenizer import chat_prompt

logger = logging.getLogger("tuneserve.server")


class ServerState:
    """What the routes share: the engine once loaded, or why it is not there."""

    def __init__(self, args: EngineArgs, settings: ServerSettings, engine: LLMEngine | None = None) -> None:
        self.args, self.settings = args, settings
        self.model_name = settings.served_model_name or args.model
        self.engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.metrics: ServerMetrics | None = None
        self.load_error: BaseException | None = None
        self.closed = False
        if engine is not None:
            self._attach(engine)

    def load(self) -> None:
        try:
            self._attach(LLMEngine.from_engine_args(self.args))
        except BaseException as e:  # noqa: BLE001 - reported by /health and every route
            self.load_error = e
            traceback.print_exc()

    def _attach(self, engine: LLMEngine) -> None:
        self.metrics = ServerMetrics(engine, self.model_name)
        self.engine = AsyncEngine(engine, on_finished=self.metrics.observe, on_fatal=self._fatal)
        self.serving = OpenAIServing(self.engine, self.model_name, self.settings)

    def _fatal(self, e: BaseException) -> None:
        """The engine loop died (its reset failed): log the cause and exit non-zero, after a moment for the
        clients' error events to go out, so that a supervisor restarts the process; never linger dead."""
        logger.critical("the engine cannot recover: %r; exiting so that a supervisor restarts the server", e,
                        exc_info=e)
        if self.settings.exit_on_fatal:
            threading.Timer(0.5, os._exit, args=(EXIT_ENGINE_DEAD,)).start()

    def detach(self) -> None:
        """Let go of the engine once the server has stopped. FastAPI keeps route functions, and so this state
        they close over, in a process-wide cache: a state that held on would keep every stopped server's
        engine and KV cache for the life of the process (an in-process tune opens one per configuration)."""
        self.engine = self.serving = self.metrics = None
        self.closed = True

    def ready(self) -> OpenAIServing:
        if self.closed:
            raise APIError(503, "the server has shut down", code="shut_down")
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="load_failed")
        if self.serving is None:
            raise APIError(503, "the model is still loading; retry shortly", code="loading",
                           headers={"Retry-After": "2"})
        if self.engine.dead is not None:
            raise APIError(503, f"the engine loop has died: {self.engine.dead!r}", code="engine_dead")
        return self.serving


def build_app(args: EngineArgs, settings: ServerSettings | None = None, engine: LLMEngine | None = None) -> FastAPI:
    """The FastAPI app. Without `engine`, the model loads in the background (/health says 503 until ready)."""
    settings = settings or ServerSettings()
    state = ServerState(args, settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if state.engine is None:
            threading.Thread(target=state.load, name="tuneserve-load", daemon=True).start()
        yield
        if state.engine is not None:
            await state.engine.drain(settings.drain_timeout)
            state.engine.shutdown()
        state.detach()

    app = FastAPI(title="tuneserve", version=tuneserve.__version__, lifespan=lifespan)
    app.state.tuneserve = state
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(HeaderLimit, limit=settings.max_header_bytes)
    _register_errors(app)
    _register_engine_errors(app)

    def auth(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            if state.metrics is not None:
                state.metrics.auth_failures.inc()
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    guarded = [Depends(auth)]

    def check_model(name: str | None) -> None:
        if name and name != state.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", "model_not_found")

    @app.get("/health")
    async def health() -> Response:
        state.ready()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": tuneserve.__version__}

    @app.get("/metrics", dependencies=guarded if settings.metrics_require_api_key else [])
    async def metrics() -> Response:
        state.ready()
        state.metrics.tasks.set(len(asyncio.all_tasks()))
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        serving = state.ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": now(),
                                            "owned_by": "tuneserve", "max_model_len": serving.max_model_len}]}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        serving = state.ready()
        prepared = await serving.admit(body, serving.prepare_completion)
        _log_request(settings, prepared)
        if body.stream:
            events = completion_events(serving, body, prepared, settings.max_request_seconds)
            return _event_stream(serving, events, prepared)
        outs = await _collect(serving, prepared, request)
        if outs is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = [ch for i, o in enumerate(outs) for ch in
                   serving.completion_choice(o, i, body.n, body.echo, body.logprobs is not None)]
        return JSONResponse({"id": prepared[0].parent.request_id.rsplit("-", 1)[0], "object": "text_completion",
                             "created": now(), "model": state.model_name, "choices": choices,
                             "usage": usage(outs)})

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        serving = state.ready()
        chat = await serving.admit(body, serving.prepare_chat)
        _log_request(settings, [chat.request])
        if body.stream:
            return _event_stream(serving, chat_events(serving, body, chat, settings.max_request_seconds),
                                 [chat.request])
        outs = await _collect(serving, [chat.request], request)
        if outs is None:
            return Response(status_code=CLIENT_CLOSED)
        (out,) = outs
        choices = [{"index": c.index, **chat_message(chat.tools, c.text, c.finish_reason),
                    "logprobs": serving.chat_logprobs(c.logprobs) if body.logprobs else None,
                    "stop_reason": c.stop_reason} for c in out.outputs]
        return JSONResponse({"id": out.request_id, "object": "chat.completion", "created": now(),
                             "model": state.model_name, "choices": choices, "usage": usage([out])})

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        serving = state.ready()
        try:
            if body.messages is not None:
                settings.limits.check_messages([m.text() for m in body.messages])
            elif body.prompt is not None:
                settings.limits.check_prompts([body.prompt])
        except ParamError as e:
            raise APIError(400, str(e), e.param) from None
        ids = await asyncio.get_running_loop().run_in_executor(serving.pool, _tokenize, serving.tokenizer, body)
        return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_model_len}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        serving = state.ready()
        vocab = serving.engine.engine.config.model.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[:5]}", "tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens)}

    return app


CLIENT_CLOSED = 499  # nginx's "client closed request": the client is gone, nobody reads it
EXIT_ENGINE_DEAD = 70  # EX_SOFTWARE


def _tokenize(tok, body: TokenizeRequest) -> list[int]:  # noqa: ANN001 - an HF tokenizer
    if body.messages is not None:
        try:
            return chat_prompt(tok, [{"role": m.role, "content": m.text()} for m in body.messages])
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
    if body.prompt is not None:
        return tok(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
    raise APIError(400, "give either prompt or messages", "prompt")


def _log_request(settings: ServerSettings, prepared: list) -> None:
    """One debug line per request: ids and sizes, and the prompt text only if the operator asked for it."""
    if logger.isEnabledFor(logging.DEBUG):
        for p in prepared:
            text = f" prompt={p.parent.prompt!r}" if settings.log_prompts else ""
            logger.debug("request %s: %d prompt tokens%s", p.parent.request_id, len(p.parent.prompt_token_ids), text)


async def _collect(serving: OpenAIServing, prepared: list, request: Request) -> list | None:
    """Final outputs of a non-streaming request, within the server's time limit (None: client gone)."""
    limit = serving.settings.max_request_seconds
    try:
        async with asyncio.timeout(limit):
            return await serving.collect(prepared, request.is_disconnected)
    except TimeoutError:
        raise APIError(504, f"the request ran past the server's limit of {limit:g} s (--max-request-seconds); "
                       "ask for fewer tokens or stream", code="timeout") from None


def _event_stream(serving: OpenAIServing, events, prepared: list) -> StreamingResponse:  # noqa: ANN001
    """An SSE response; if its body never starts (the client left at once), the requests' admission is
    released, as the stream's own cleanup would have done."""

    def unstarted() -> None:
        for p in prepared:
            serving.engine.release(p.params.n)

    return StreamingResponse(GuardedBody(events, unstarted), media_type="text/event-stream")


def _register_engine_errors(app: FastAPI) -> None:
    @app.exception_handler(RequestFailedError)
    async def failed(_: Request, e: RequestFailedError) -> JSONResponse:
        err = APIError(e.error.status, e.error.message, code="engine_error")
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(EngineBusyError)
    async def busy(_: Request, e: EngineBusyError) -> JSONResponse:
        return JSONResponse(APIError(503, str(e), code="resetting").body(), status_code=503,
                            headers={"Retry-After": "1"})


def _register_errors(app: FastAPI) -> None:
    """OpenAI-style error JSON for every failure, and an OpenAPI document that says so (FastAPI's would
    promise a 422) and carries the bounds of this server's requests (schema.py)."""
    state = app.state.tuneserve
    base_openapi, served = app.openapi, {}

    def openapi() -> dict:
        if "schema" in served:
            return served["schema"]
        engine = state.engine.engine if state.engine is not None else None
        tools = state.serving is not None and state.serving.tool_parser is not None
        schema = server_openapi(base_openapi(), state.settings, engine, state.model_name, tools)
        if engine is not None:  # complete once the model is loaded: keep it
            served["schema"] = schema
        return schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(list(e.errors()), e.body).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not UTF-8 JSON, an unknown path or method) in OpenAI's shape
        err = APIError(e.status_code, str(e.detail), "body" if e.status_code == 400 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return JSONResponse(APIError(503, str(e), code="engine_dead").body(), status_code=503)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        traceback.print_exc()
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)
