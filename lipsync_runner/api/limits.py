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

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from lipsync_runner.errors import InputTooLargeError

MiB = 1024 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Room for the multipart framing and the small text fields on top of the two files.
MULTIPART_OVERHEAD_BYTES = 1 * MiB


class ApiLimits(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    max_video_bytes: int = Field(default=500 * MiB, gt=0, description="Largest accepted video upload.")
    max_audio_bytes: int = Field(default=100 * MiB, gt=0, description="Largest accepted audio upload.")
    max_video_seconds: float = Field(default=600.0, gt=0, description="Longest accepted video (413 above).")
    max_audio_seconds: float = Field(default=600.0, gt=0, description="Longest accepted audio (413 above).")
    max_video_pixels: int = Field(default=3840 * 2160, gt=0, description="Largest frame, width x height (413 above).")
    max_fps: float = Field(default=120.0, gt=0, description="Highest accepted video frame rate (413 above).")
    max_job_scratch_gb: float = Field(
        default=200.0, ge=0, description="Most scratch disk one job may need: raw ping-pong frames plus the output "
                                         "(413 above; 0: no cap).")
    wait_timeout_s: float = Field(default=3600.0, gt=0, description="Longest a `wait=true` generate call blocks.")
    bbox_shift: int = Field(default=0, ge=-100, le=100, description="bbox_shift of jobs that do not give one.")
    debug: bool = Field(default=False, description="Add tracebacks to 500 responses (development only).")
    max_uploads_per_client: int = Field(default=4, ge=1, description="Uploads one client (token, or address "
                                        "without auth) may have in progress at once (429 beyond).")
    max_concurrent_uploads: int = Field(default=32, ge=1, description="Uploads in progress at once (429 beyond).")
    upload_idle_timeout_s: float = Field(default=30.0, gt=0, description="An upload with no data for this long "
                                         "is cut off (408).")
    upload_min_bytes_per_s: int = Field(default=32 * 1024, ge=0, description="Slowest average upload rate "
                                        "accepted once the grace period has passed (408 below).")
    upload_rate_grace_s: float = Field(default=20.0, ge=0, description="Seconds before the minimum rate applies.")
    url_prefix: str = Field(
        default="/api/lip-sync", description="Public path the API is mounted at (for status/download URLs)."
    )

    @property
    def max_job_scratch_bytes(self) -> int | None:
        return int(self.max_job_scratch_gb * 10**9) or None

    @property
    def max_request_bytes(self) -> int:
        """Largest acceptable /generate body: both files plus the multipart framing."""
        return self.max_video_bytes + self.max_audio_bytes + MULTIPART_OVERHEAD_BYTES


def human_size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MB"
    if n >= MiB:
        return f"{n / MiB:.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"


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
