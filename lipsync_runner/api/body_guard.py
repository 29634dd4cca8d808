"""Every small request body is read under the rules uploads already follow, before the app sees it.

A client that declares a JSON or form body and then sends a byte every 20 s would otherwise hold a
connection, and with it a share of the server's request capacity, for as long as it likes: a few
hundred such requests and everyone else's calls are refused. `BodyGuard` (pure ASGI, over the whole
`LipSync` app, inside the token check so it knows the client) reads each non-multipart body itself:

* a slot per client and in all (429 at once beyond them, before a byte is read), so one client's
  slow bodies can never take every slot;
* an overall deadline, an idle timeout and a minimum rate (408 past them);
* a size cap (413 above it): these bodies hold job parameters, not files.

The body is then replayed to the app at once. Multipart bodies to the routes that take files pass
through: the admission path holds uploads to the same rules with its own slots (api/admission.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from lipsync_runner.api.auth import request_client
from lipsync_runner.api.limits import too_large_body
from lipsync_runner.config import ApiLimits
from lipsync_runner.inputs.files import human_size

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_SMALL_BODY_BYTES = 1024 * 1024  # job parameters and BentoML's JSON calls: far below this
UPLOAD_ROUTES = ("/generate", "/avatars", "/preview")
CLOSE = {"connection": "close"}  # a refusal here may leave the body unread: the connection cannot be reused  # REST and BentoML: where files come in


class BodySlots:
    """Bodies being received, per client and in all. One event loop: no lock is needed."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.by_client: Counter[str] = Counter()

    @property
    def in_use(self) -> int:
        return sum(self.by_client.values())

    @property
    def saturated(self) -> bool:
        """Every slot is taken: no new body can be read (readiness says so)."""
        return self.in_use >= self.total

    def refusal(self, client: str) -> str | None:
        if self.by_client[client] >= self.per_client:
            return (f"too many requests with a body in progress from this client (at most {self.per_client} "
                    "at once); send each body whole and promptly")
        if self.saturated:
            return "the server is receiving too many requests at once; try again shortly"
        return None


class BodyGuard:
    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limits: ApiLimits,
                 slots: BodySlots) -> None:
        self.app = app
        self.limits = limits
        self.slots = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope) or _is_upload(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > MAX_SMALL_BODY_BYTES:
            await answer_json(send, 413, too_large_body(_too_large()), CLOSE)
            return
        client = request_client(scope)
        refusal = self.slots.refusal(client)
        if refusal is not None:
            await answer_json(send, 429, {"error": refusal}, {**CLOSE, "retry-after": "5"})
            return
        self.slots.by_client[client] += 1
        try:
            body, problem = await self._read(receive)
        finally:
            self.slots.by_client[client] -= 1
            if self.slots.by_client[client] <= 0:
                del self.slots.by_client[client]
        if problem is not None:
            status, message = problem
            await answer_json(send, status, too_large_body(message) if status == 413 else {"error": message}, CLOSE)
            return
        await self.app(scope, replay(body, receive), send)

    async def _read(self, receive: Receive) -> tuple[bytes, tuple[int, str] | None]:
        limits = self.limits
        start = time.monotonic()
        deadline = start + limits.body_deadline_s
        body = bytearray()
        while True:
            now = time.monotonic()
            wait = min(limits.upload_idle_timeout_s, deadline - now)
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.001))
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    return b"", (408, f"Request body too slow: not received within {limits.body_deadline_s:g} s")
                return b"", (408, f"Request body stalled: no data for {limits.upload_idle_timeout_s:g} s")
            if message["type"] == "http.disconnect":
                return b"", (400, "Request body interrupted")
            body += message.get("body", b"")
            if len(body) > MAX_SMALL_BODY_BYTES:
                return b"", (413, _too_large())
            if not message.get("more_body", False):
                return bytes(body), None
            elapsed = time.monotonic() - start
            if elapsed > limits.upload_rate_grace_s and len(body) / elapsed < limits.upload_min_bytes_per_s:
                return b"", (408, f"Request body too slow: below {human_size(limits.upload_min_bytes_per_s)}/s")


def _too_large() -> str:
    return f"Request body too large (at most {human_size(MAX_SMALL_BODY_BYTES)}; files go as multipart/form-data)"


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


def _content_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _has_body(scope: Scope) -> bool:
    length = _content_length(scope)
    return bool(length) or header(scope, b"transfer-encoding") is not None


def _is_upload(scope: Scope) -> bool:
    """A multipart body to a route that takes files: the admission path's upload rules hold it."""
    multipart = (header(scope, b"content-type") or b"").lower().startswith(b"multipart/")
    return multipart and scope.get("path", "").rstrip("/").endswith(UPLOAD_ROUTES)


def replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives ``body`` whole first (a body read ahead), then what comes after it."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


async def answer_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """A whole JSON answer, sent before the app ran."""
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
           *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
