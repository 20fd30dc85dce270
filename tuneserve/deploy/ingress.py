"""The OpenAI-compatible ingress: one FastAPI deployment in front of the engine replicas.

Every route but /metrics is relayed to a replica through a Ray Serve handle (the router, router.py,
chooses which), and the replica's own server answers it (replica.py). What the ingress adds:

- backpressure: past the replicas' max_ongoing_requests and the handle's max_queued_requests, Ray
  refuses the request and the client gets a 503 with Retry-After and an OpenAI-style error body;
- faults: a request whose response had not started (no byte sent to the client) when its replica
  failed is retried once on another replica; a stream that had started ends with an error event, then
  `[DONE]`, as the single server ends a stream its engine failed;
- /metrics: every replica's tuneserve metrics on one page, each sample labelled with its replica;
- an `x-tuneserve-replica` response header naming the replica that answered.
"""

# no `from __future__ import annotations`: FastAPI must see the route parameters' real types
import asyncio
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from tuneserve.deploy.metrics import merge_metrics
from tuneserve.deploy.router import live_replica_ids
from tuneserve.server.protocol import APIError

logger = logging.getLogger("tuneserve.deploy")

# no docs of its own: /docs and /openapi.json are relayed to a replica, whose document is the real API's
api = FastAPI(title="tuneserve (replicas)", docs_url=None, redoc_url=None, openapi_url=None)
_DROP = {"content-length", "transfer-encoding", "connection", "host"}  # hop-by-hop: recomputed here
RETRY_AFTER_S = "1"
REPLICA_HEADER = "x-tuneserve-replica"


def unavailable(message: str, code: str) -> JSONResponse:
    """A 503 with Retry-After and the server's own error body (server/protocol.py)."""
    return JSONResponse(APIError(503, message, code=code).body(), status_code=503,
                        headers={"Retry-After": RETRY_AFTER_S})


def stream_error(message: str) -> bytes:
    """The end of a stream whose replica failed, as the server ends a stream its engine failed (the SSE lines
    written here: the server's serving module would bring torch into the ingress)."""
    return f"data: {json.dumps(APIError(503, message, code='replica_failed').body())}\n\ndata: [DONE]\n\n".encode()


class _Unstarted(Exception):
    """The replica failed before the response started: safe to retry elsewhere."""

    def __init__(self, message: str, replica: str | None) -> None:
        super().__init__(message)
        self.replica = replica  # None: it failed before saying who it was


@serve.ingress(api)
class Ingress:
    def __init__(self, replicas: DeploymentHandle) -> None:
        self.replicas = replicas
        self.stream = replicas.options(method_name="handle", stream=True)

    async def _open(self, payload: dict) -> tuple[dict, object, list[bytes], bool]:
        """Send the request to a replica; return (head, generator, body chunks read so far, finished).
        Raises _Unstarted if the replica failed before anything could reach the client."""
        gen = self.stream.remote(payload)
        chunks: list[bytes] = []
        head: dict = {}
        try:
            head = await gen.__anext__()
            sse = any(k == "content-type" and v.startswith("text/event-stream") for k, v in head["headers"])
            if not sse:  # a whole response: read it all before answering (a failure is still retryable)
                async for c in gen:
                    chunks.append(c)
                return head, gen, chunks, True
            try:  # a stream has started once its first event is out: read that one here
                chunks.append(await gen.__anext__())
            except StopAsyncIteration:
                return head, gen, chunks, True
            return head, gen, chunks, False
        except BackPressureError:
            raise
        except (RayError, RuntimeError) as e:
            gen.cancel()
            raise _Unstarted(repr(e), head.get("replica")) from e

    async def _relay(self, request: Request, path: str) -> Response:
        body = await request.body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None  # the replica's server answers the 400
        payload = {"method": request.method, "path": "/" + path, "query": request.url.query,
                   "headers": [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP],
                   "body": body, "json": parsed if isinstance(parsed, dict) else None, "avoid": []}
        last = ""
        for _attempt in range(2):  # the first try and one retry on another replica
            try:
                head, gen, chunks, finished = await self._open(payload)
                break
            except BackPressureError as e:
                return unavailable(f"all replicas are busy ({e}); retry shortly", "overloaded")
            except _Unstarted as e:
                logger.warning("replica failed before responding (%s); retrying elsewhere", e)
                last = str(e)
                if e.replica:  # Ray may not know yet that it is dead: the router ranks it last
                    payload["avoid"].append(e.replica)
                await asyncio.sleep(0.05)
        else:
            return unavailable(f"the replicas failed to answer: {last}", "replica_failed")
        headers = {k: v for k, v in head["headers"] if k.lower() not in _DROP}
        headers[REPLICA_HEADER] = head.get("replica", "")
        if finished:
            return Response(b"".join(chunks), status_code=head["status"], headers=headers)

        async def rest():  # noqa: ANN202
            done = False
            try:
                for c in chunks:
                    yield c
                async for c in gen:
                    yield c
                done = True
            except (RayActorError, RayError, RuntimeError) as e:
                logger.warning("replica failed mid-stream: %r", e)
                done = True
                yield stream_error(f"the replica serving this stream failed: {type(e).__name__}")
            finally:
                if not done:  # the client left: stop the replica's work
                    gen.cancel()

        return StreamingResponse(rest(), status_code=head["status"], headers=headers)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        pages = await self.replica_metrics()
        return Response(merge_metrics(pages), media_type="text/plain; version=0.0.4")

    async def replica_metrics(self) -> dict[str, str]:
        """Each live replica's metrics page, fetched through the one router, pinned to each replica in turn
        (a second handle would bring a second, cold router)."""

        async def page(target: str | None) -> tuple[str, str]:
            gen = self.stream.remote({"metrics": True, "target": target})
            try:
                item = await asyncio.wait_for(gen.__anext__(), 10)
            finally:
                gen.cancel()
            return item["replica"], item["metrics"]

        ids = live_replica_ids()
        if not ids:  # the router starts with the handle's first call
            first = await page(None)
            ids = live_replica_ids()
            if not ids:
                return dict([first])
        pages = {}
        # one at a time: calls made while serving one HTTP request share its request id, and Ray's router
        # matches concurrent ones to the wrong pending request (a pinned call then waits forever)
        for i in ids:
            try:
                rid, text = await page(i)
                pages[rid] = text
            except (RayError, RuntimeError, TimeoutError) as e:
                logger.warning("replica %s did not give its metrics: %r", i, e)
        return pages

    @api.api_route("/{path:path}", methods=["GET", "POST"])
    async def relay(self, path: str, request: Request) -> Response:
        return await self._relay(request, path)
