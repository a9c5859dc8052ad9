"""An ASGI middleware in front of the service's endpoints: request bodies are bounded in
size, and multipart bodies are parsed once before BentoML sees them.

BentoML 1.4 answers a malformed ``multipart/form-data`` body (no boundary, a broken part
header) with a 500: starlette's parser raises and BentoML's endpoint wrapper treats every
exception it does not know as a server error. The guard parses such bodies first and
answers 400 naming the problem; a body over the limit gets 413. Health, readiness and
metrics requests (GET) pass untouched.
"""

from __future__ import annotations

import json


async def _respond(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: 413 for POST bodies over ``max_body_bytes``, 400 for multipart
    bodies starlette cannot parse; everything else is replayed to the app unchanged."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return await _respond(send, 413, f"request body over {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = await self._multipart_problem(scope, body)
        if problem:
            return await _respond(send, 400, problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _multipart_problem(scope, body: bytes) -> str | None:
        from starlette.datastructures import Headers
        from starlette.formparsers import MultiPartParser

        headers = Headers(scope=scope)
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "multipart/form-data":
            return None

        async def stream():
            yield body

        try:
            form = await MultiPartParser(headers, stream()).parse()
            await form.close()
        except Exception as e:  # noqa: BLE001 - any parse failure is the request's fault
            detail = getattr(e, "message", None) or str(e) or type(e).__name__
            return f"malformed multipart/form-data body: {detail}"
        return None
