"""An ASGI middleware that refuses request bodies over a size limit with 413.

A declared `Content-Length` over the limit is refused before anything is
read; any other body is read here, counted as it arrives, and refused as
soon as it passes the limit. Under the limit, the route is handed the body
it would have read anyway, so no route ever holds more than `max_bytes`.
"""

from __future__ import annotations

from typing import Any

import orjson

Scope = dict[str, Any]
Receive = Any
Send = Any


class BodySizeLimitMiddleware:
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
        body = orjson.dumps({"error": {
            "message": f"the request body is larger than the server's limit of {limit_mib:g} MiB "
                       "(--max-request-body-mb)",
            "type": "invalid_request_error", "param": None, "code": 413}})
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
