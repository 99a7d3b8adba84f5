"""ASGI middlewares that turn a request away before any route runs: a body
over the size limit (413), a missing API key (401), new work while the
server shuts down (503).

Plain ASGI on purpose: Starlette's `@app.middleware("http")` wraps `receive`
so that `request.is_disconnected()` never turns true inside a route, and a
non-streamed request whose client left would run to the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

Scope = dict[str, Any]
Receive = Any
Send = Any


async def send_error(send: Send, status: int, message: str, err_type: str,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An OpenAI-shaped error body, written straight to the connection."""
    body = orjson.dumps({"error": {"message": message, "type": err_type, "param": None, "code": status}})
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Every path except `open_paths` needs `Authorization: Bearer <key>`."""

    def __init__(self, app: Any, api_key: str, open_paths: tuple[str, ...]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            if dict(scope.get("headers", ())).get(b"authorization") != self.expected:
                await send_error(send, 401, "invalid or missing API key", "invalid_request_error")
                return
        await self.app(scope, receive, send)


class DrainMiddleware:
    """While `is_draining()`, new calls to `work_paths` get 503 with Retry-After."""

    def __init__(self, app: Any, is_draining: Callable[[], bool], work_paths: tuple[str, ...]) -> None:
        self.app = app
        self.is_draining = is_draining
        self.work_paths = work_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.work_paths and self.is_draining():
            await send_error(send, 503, "the server is shutting down", "service_unavailable",
                             ((b"retry-after", b"1"),))
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """A declared `Content-Length` over the limit is refused before anything
    is read; any other body is read here, counted as it arrives, and refused
    as soon as it passes the limit. Under the limit, the route is handed the
    body it would have read anyway, so no route holds more than `max_bytes`."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay_then_receive() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay_then_receive, send)

    async def _refuse(self, send: Send) -> None:
        limit_mib = self.max_bytes / (1 << 20)
        message = f"the request body is larger than the server's limit of {limit_mib:g} MiB (--max-request-body-mb)"
        # Close: the rest of the body is still on its way and is not read.
        await send_error(send, 413, message, "invalid_request_error", ((b"connection", b"close"),))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
