"""Request guards in front of every route: body size limits and the bearer token.

Both are plain ASGI middleware so that a refused request is answered before FastAPI reads or
parses its body: an oversized body is never held in memory, and an unauthenticated caller gets
no further than a 401.
"""

from __future__ import annotations

import json
import re
import secrets

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The two bodies that are files, streamed to disk under their own, larger limit
# (settings.max_upload_bytes): a one-shot upload and a PATCH of an upload session (ours or tus's). Every other
# body (JSON, the upload sessions' own included) is held to the request limit.
UPLOAD_BODIES = {"POST": re.compile(r"^/api/artifacts/?$"),
                 "PATCH": re.compile(r"^/api/(artifacts/uploads|tus)/[^/]+/?$")}


def is_upload_body(scope: Scope) -> bool:
    pattern = UPLOAD_BODIES.get(scope["method"])
    return pattern is not None and pattern.match(scope["path"]) is not None


# The trainer's two POST endpoints authenticate with the job's own token instead of the server token.
TRAINER_PATH = re.compile(r"^/api/jobs/\d+/(events|artifacts/register)$")
# Open even with a token: a liveness probe (start-up checks, monitors) learns nothing from it.
OPEN_PATHS = {"/api/health"}


async def _send_json(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised from inside the body stream; FastAPI turns it into the 413 response itself."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"Request body is larger than the limit of {max_bytes} bytes.")


class RequestLimitMiddleware:
    """Answer 413 to a body over ``max_bytes``: from Content-Length at once, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_upload_body(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await _send_json(send, 413, BodyTooLarge(self.max_bytes).detail)
                    return
            except ValueError:
                await _send_json(send, 400, "Content-Length is not a number.")
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where FastAPI does not catch it
            if not started:
                await _send_json(send, 413, exc.detail)


class TokenMiddleware:
    """With a server token set, every ``/api`` request must carry ``Authorization: Bearer``.

    Reads need it too: job listings, logs and artifacts name the machine's paths and hold the
    user's data. Only ``/api/health`` stays open (a liveness probe learns nothing), and so do the
    dashboard's static files and ``/docs``, which hold nothing but code.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] != "http" or not self.token or not path.startswith("/api/") or path in OPEN_PATHS
                or (scope["method"] == "POST" and TRAINER_PATH.match(path))):
            await self.app(scope, receive, send)
            return
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), self.token.encode()):
            detail = ("This server requires 'Authorization: Bearer <token>' on every /api request but /api/health; "
                      "the token was missing or wrong.")
            await _send_json(send, 401, detail, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
