"""FastAPI application: OpenAI-compatible routes, health, metrics, tokenizer endpoints, errors, limits."""

from __future__ import annotations

import hmac
import threading
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

import tuneserve
from tuneserve.engine import LLMEngine
from tuneserve.engine_args import EngineArgs
from tuneserve.server.async_engine import AsyncEngine, EngineDeadError
from tuneserve.server.metrics import ServerMetrics
from tuneserve.server.openai_serving import OpenAIServing, now, sse, usage
from tuneserve.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from tuneserve.tokenizer import chat_prompt


@dataclass
class ServerSettings:
    served_model_name: str | None = None
    api_key: str | None = None
    max_waiting_requests: int = 256
    max_request_bytes: int = 8 << 20
    drain_timeout: float = 30.0


class ServerState:
    """What the routes share: the engine once loaded, or why it is not there."""

    def __init__(self, args: EngineArgs, settings: ServerSettings, engine: LLMEngine | None = None) -> None:
        self.args, self.settings = args, settings
        self.model_name = settings.served_model_name or args.model
        self.engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.metrics: ServerMetrics | None = None
        self.load_error: BaseException | None = None
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
        self.engine = AsyncEngine(engine, on_finished=self.metrics.observe)
        self.serving = OpenAIServing(self.engine, self.model_name, self.settings.max_waiting_requests)

    def ready(self) -> OpenAIServing:
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="load_failed")
        if self.serving is None:
            raise APIError(503, "the model is still loading; retry shortly", code="loading",
                           headers={"Retry-After": "2"})
        if self.engine.dead is not None:
            raise APIError(503, f"the engine loop has died: {self.engine.dead!r}", code="engine_dead")
        return self.serving


class BodyLimit:
    """ASGI middleware: 413 for request bodies over a size limit (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:  # noqa: ANN001
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited():  # noqa: ANN202
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body exceeds {self.limit} bytes")
            return msg

        try:
            await self.app(scope, limited, send)
        except APIError:
            await self._reject(send)

    async def _reject(self, send) -> None:  # noqa: ANN001
        err = APIError(413, f"request body exceeds the limit of {self.limit} bytes; send a smaller request")
        resp = JSONResponse(err.body(), status_code=413)
        await resp({"type": "http"}, None, send)


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

    app = FastAPI(title="tuneserve", version=tuneserve.__version__, lifespan=lifespan)
    app.state.tuneserve = state
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    _register_errors(app)

    def auth(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

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

    @app.get("/metrics")
    async def metrics() -> Response:
        state.ready()
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict:
        serving = state.ready()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": now(),
                                            "owned_by": "tuneserve", "max_model_len": serving.max_model_len}]}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        serving = state.ready()
        prepared = serving.prepare_completion(body)
        if body.stream:
            return StreamingResponse(_stream_completion(serving, body, prepared), media_type="text/event-stream")
        outs = await serving.collect(prepared, request.is_disconnected)
        choices = [ch for i, o in enumerate(outs) for ch in
                   serving.completion_choice(o, i, body.n, body.echo, body.logprobs is not None)]
        return JSONResponse({"id": prepared[0].parent.request_id.rsplit("-", 1)[0], "object": "text_completion",
                             "created": now(), "model": state.model_name, "choices": choices,
                             "usage": usage(outs)})

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        serving = state.ready()
        prepared = serving.prepare_chat(body)
        if body.stream:
            return StreamingResponse(_stream_chat(serving, body, prepared), media_type="text/event-stream")
        (out,) = await serving.collect([prepared], request.is_disconnected)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": serving.chat_logprobs(c.logprobs) if body.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        return JSONResponse({"id": out.request_id, "object": "chat.completion", "created": now(),
                             "model": state.model_name, "choices": choices, "usage": usage([out])})

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model)
        serving = state.ready()
        tok = serving.tokenizer
        if body.messages is not None:
            try:
                ids = chat_prompt(tok, [{"role": m.role, "content": m.text()} for m in body.messages])
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
        elif body.prompt is not None:
            ids = tok(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        else:
            raise APIError(400, "give either prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_model_len}

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model)
        serving = state.ready()
        vocab = serving.engine.engine.config.model.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens must be in [0, {vocab}), got {bad[:5]}", "tokens")
        return {"prompt": serving.tokenizer.decode(body.tokens)}

    return app


async def _stream_completion(serving: OpenAIServing, body: CompletionRequest, prepared) -> object:  # noqa: ANN001
    rid = prepared[0].parent.request_id.rsplit("-", 1)[0]
    created, finals, sent = now(), {}, {}

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created, "model": serving.model_name,
                    "choices": choices, **extra})

    try:
        async for i, out in serving.merged(prepared):
            choices = []
            for c in out.outputs:
                key = (i, c.index)
                t0, k0, done = sent.get(key, (0, 0, False))
                if done:
                    continue
                text = c.text[t0:]
                if body.echo and t0 == 0 and k0 == 0:
                    text = (out.prompt or "") + text
                if not text and c.finish_reason is None and len(c.token_ids) == k0:
                    continue
                lps = serving._completion_logprobs(c.logprobs[k0:]) if body.logprobs is not None and c.logprobs \
                    else None
                choices.append({"index": i * body.n + c.index, "text": text, "logprobs": lps,
                                "finish_reason": c.finish_reason})
                sent[key] = (len(c.text), len(c.token_ids), c.finish_reason is not None)
            if choices:
                yield chunk(choices)
            if out.finished:
                finals[i] = out
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], usage=usage(list(finals.values())))
    except (EngineDeadError, ValueError) as e:
        yield sse(APIError(500, str(e)).body())
    yield sse("[DONE]")


async def _stream_chat(serving: OpenAIServing, body: ChatCompletionRequest, prepared) -> object:  # noqa: ANN001
    rid = prepared.parent.request_id
    created, sent, final = now(), {}, None

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": serving.model_name,
                    "choices": choices, **extra})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(body.n)])
    try:
        async for _, out in serving.merged([prepared]):
            choices = []
            for c in out.outputs:
                t0, k0, done = sent.get(c.index, (0, 0, False))
                if done or (len(c.text) == t0 and c.finish_reason is None):
                    continue
                lps = serving.chat_logprobs(c.logprobs[k0:]) if body.logprobs and c.logprobs else None
                delta = {"content": c.text[t0:]} if len(c.text) > t0 else {}
                choices.append({"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": c.finish_reason})
                sent[c.index] = (len(c.text), len(c.token_ids), c.finish_reason is not None)
            if choices:
                yield chunk(choices)
            final = out
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield chunk([], usage=usage([final]))
    except (EngineDeadError, ValueError) as e:
        yield sse(APIError(500, str(e)).body())
    yield sse("[DONE]")


def _register_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", []) if x != "body"]
        param = ".".join(loc) or None
        msg = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return JSONResponse(APIError(400, msg, param).body(), status_code=400)

    @app.exception_handler(EngineDeadError)
    async def dead(_: Request, e: EngineDeadError) -> JSONResponse:
        return JSONResponse(APIError(503, str(e), code="engine_dead").body(), status_code=503)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        traceback.print_exc()
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)
