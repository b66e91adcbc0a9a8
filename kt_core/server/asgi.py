"""Plain ASGI pieces of the server: the API-key check, the body-size limit and the client-disconnect
watcher.

The API-key check is a pure ASGI middleware rather than ``@app.middleware("http")``
(Starlette's ``BaseHTTPMiddleware``): it passes ``receive`` and ``send`` through untouched,
so an endpoint sees the server's own ``http.disconnect`` message, and streams are not
copied through an extra memory channel.
"""
from __future__ import annotations

import hmac
from typing import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from kt_core.server.protocol import error_body

OPEN_PATHS = frozenset({"/health"})  # answered without the API key (load balancers probe it)


class ApiKeyMiddleware:
    """Answer 401 (OpenAI error body) to HTTP requests without ``Authorization: Bearer <key>``.
    ``get_key()`` returns the key, or None when the server has none (then everything passes)."""

    def __init__(self, app: ASGIApp, get_key: Callable[[], "str | None"], env_name: str = "") -> None:
        self.app, self.get_key, self.env_name = app, get_key, env_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.get_key()
        if scope["type"] == "http" and key and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(header, f"Bearer {key}".encode()):
                body = error_body("missing or wrong API key: send 'Authorization: Bearer <key>' (the key is the "
                                  f"value of ${self.env_name} on the server)", "invalid_request_error",
                                  code="invalid_api_key")
                await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive,
                                                                                                 send)
                return
        await self.app(scope, receive, send)


async def wait_for_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    """Await the client's ``http.disconnect`` (after the body was read, the next message an ASGI
    server sends is that one), then call ``on_disconnect()``. Run it as a task beside a
    request's work and cancel it once the answer is ready; it reacts as soon as the
    connection closes, with no polling and whether or not tokens are arriving."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the connection broke in a way the server reports as an error: gone all the same
        pass
    on_disconnect()


class BodyLimitMiddleware:
    """Answer 413 (OpenAI error body) to an HTTP request whose body passes ``limit`` bytes, before any
    endpoint parses or tokenizes it (a 20 MB prompt took the event loop 23 s to refuse as too long).
    A declared Content-Length is checked first; otherwise the body is read up to the limit and handed
    on as it came."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        body = error_body(f"the request body is {size} bytes; this server takes at most {self.limit} (a prompt "
                          "longer than the model's context could not be served anyway)", "invalid_request_error",
                          code="request_too_large")
        await JSONResponse(body, status_code=413)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send, declared.decode())
        if declared is not None and declared.isdigit():
            return await self.app(scope, receive, send)  # the server stops at the declared length
        messages, total = [], 0
        while True:  # no length given (chunked): read it here, up to the limit
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.limit:
                return await self._refuse(scope, receive, send, f"over {total}")
            if not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)
