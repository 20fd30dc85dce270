"""ASGI middleware of the server: request header and body size limits."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from tuneserve.server.protocol import APIError


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


class HeaderLimit:
    """ASGI middleware: 431 for a request whose headers together exceed a size limit. (uvicorn's own h11
    limit only bounds headers that arrive in pieces; a complete oversized block passes it.)"""

    def __init__(self, app, limit: int) -> None:  # noqa: ANN001
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "http":
            size = sum(len(k) + len(v) for k, v in scope.get("headers") or [])
            if size > self.limit:
                err = APIError(431, f"request headers take {size} bytes, over the limit of {self.limit}; send "
                               "smaller headers", code="headers_too_large", err_type="invalid_request_error")
                return await JSONResponse(err.body(), status_code=431)(scope, receive, send)
        return await self.app(scope, receive, send)
