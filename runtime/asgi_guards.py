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
    """A body over `max_bytes` is a 413, and no route ever sees it. Under the
    limit, the route is handed the body it would have read anyway, so no
    route holds more than `max_bytes`.

    The 413 is sent only once the client has sent its whole body (read here
    and dropped, never kept): a client writes its whole body before it reads
    the answer (urllib, requests, httpx), and a connection closed while it
    still writes reaches it as a reset or a broken pipe instead of the 413.
    With the body read to its end the connection stays open for the next
    request. Two bodies are refused at once, unread, with `Connection:
    close`: a declared `Content-Length` over `drain_bytes`, and a declared
    length over the limit with `Expect: 100-continue` (uvicorn sends the
    100 Continue on the first `receive()`, so such a client never sends the
    body it was refused; closing keeps its unsent body from being parsed as
    the next request). A chunked body that passes `drain_bytes` is answered
    and closed there."""

    def __init__(self, app: Any, max_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # How much of a refused body is still read (and dropped) so that its
        # client gets the 413: the whole body up to 4x the limit, and never less
        # than the limit plus 64 MiB. Reading it costs no memory (each chunk is
        # dropped, and uvicorn buffers at most 64 KiB of it) and, on loopback,
        # well under a second per 64 MiB; what it bounds is the time and
        # bandwidth a client can make us spend on a body we refuse. A body a few
        # times the limit is an honest mistake (a prompt or a batch too big)
        # and its client deserves a readable answer; past that the client sends
        # far more than anyone could mean, and is answered and cut off as before.
        self.drain_bytes = drain_bytes if drain_bytes is not None else max(4 * max_bytes, max_bytes + (64 << 20))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            if declared > self.drain_bytes or _expects_100_continue(scope):
                await self._refuse(send, close=True)
            else:
                await self._refuse_after_reading(receive, send, seen=0)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more_body = message.get("more_body", False)
            if size > self.max_bytes:
                chunks.clear()
                if more_body:
                    await self._refuse_after_reading(receive, send, seen=size)
                else:
                    await self._refuse(send, close=False)
                return
            chunks.append(chunk)
            if not more_body:
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

    async def _refuse_after_reading(self, receive: Receive, send: Send, seen: int) -> None:
        """Read the rest of the body and drop it, up to `drain_bytes` in all
        (`seen` of them read already), then answer 413; close the connection
        unless the body was read to its end."""
        while seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nobody to answer
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                await self._refuse(send, close=False)
                return
        await self._refuse(send, close=True)

    async def _refuse(self, send: Send, close: bool) -> None:
        limit_mib = self.max_bytes / (1 << 20)
        message = f"the request body is larger than the server's limit of {limit_mib:g} MiB (--max-request-body-mb)"
        # `close` when the rest of the body is not read: it must not be taken for the next request.
        headers = ((b"connection", b"close"),) if close else ()
        await send_error(send, 413, message, "invalid_request_error", headers)


def _expects_100_continue(scope: Scope) -> bool:
    return any(name == b"expect" and value.lower() == b"100-continue" for name, value in scope.get("headers", ()))


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
