"""Request limits of the REST API, and an ASGI middleware that enforces the body size.

``ApiLimits`` reads ``LIP_SYNC_*`` environment variables (the seed's 500 MB video /
100 MB audio limits are the defaults). ``BodySizeLimitMiddleware`` is a pure ASGI
middleware so it can wrap any app (this API and BentoML's own endpoints): it answers
413 from the Content-Length header before the app runs, and for bodies without one
(chunked / streamed) it counts bytes as the app reads them and cuts the body off as
soon as the limit is passed -- nothing is buffered here.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Iterable, MutableMapping


from lipsync_runner.errors import InputTooLargeError
from lipsync_runner.inputs.files import human_size

MiB = 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]



def too_large_body(message: str) -> dict[str, str]:
    """The seed's 413 body."""
    return {"error": "File too large", "message": message}


class BodyTooLargeError(InputTooLargeError):
    """Raised from ``receive`` into the wrapped app once the body passes the limit.

    A LipSyncError (413) so apps that map those errors stop quietly; whatever the
    app answers is dropped and the middleware sends the seed's 413 body itself.
    """


def _route_paths(scope: Scope) -> tuple[str, ...]:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return (path, path[len(root) :] or "/")
    return (path,)


class BodySizeLimitMiddleware:
    """Reject request bodies over ``max_bytes`` on paths starting with one of ``paths_prefixes``.

    ``paths_prefixes=None`` applies the limit to every path. Prefixes are matched
    against the path both with and without the app's ``root_path``, so the same
    prefix works whether the wrapped app is mounted or not.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        paths_prefixes: Iterable[str] | None = None,
        *,
        path_prefixes: Iterable[str] | None = None,  # alias
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if paths_prefixes is not None and path_prefixes is not None:
            raise TypeError("pass paths_prefixes or path_prefixes, not both")
        prefixes = paths_prefixes if paths_prefixes is not None else path_prefixes
        self.app = app
        self.max_bytes = int(max_bytes)
        if isinstance(prefixes, str):
            prefixes = (prefixes,)
        self.paths_prefixes = tuple(prefixes) if prefixes is not None else None

    def _applies(self, scope: Scope) -> bool:
        if scope.get("type") != "http":
            return False
        if self.paths_prefixes is None:
            return True
        return any(p.startswith(prefix) for p in _route_paths(scope) for prefix in self.paths_prefixes)

    def _message(self) -> str:
        return f"The uploaded file exceeds the maximum allowed size (request body limit {human_size(self.max_bytes)})"

    async def _send_413(self, send: Send) -> None:
        body = json.dumps(too_large_body(self._message())).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._applies(scope):
            await self.app(scope, receive, send)
            return

        for name, value in scope.get("headers") or ():
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await self._send_413(send)
                    return
                break

        received = 0
        overflowed = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, overflowed
            if overflowed:  # the app keeps reading after the cut-off: end it again
                raise BodyTooLargeError(self._message())
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    overflowed = True
                    raise BodyTooLargeError(self._message())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if overflowed and not response_started:
                return  # the app's own error response for the cut-off body; ours goes out below
            if message.get("type") == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not overflowed or response_started:
                raise
        if overflowed and not response_started:
            await self._send_413(send)
