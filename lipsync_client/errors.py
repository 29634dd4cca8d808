"""Typed errors of the lip-sync client. Every one carries the server's own message.

    LipSyncClientError(message, status_code=None)   base of everything raised here
    ├── BadRequest            400  the input was refused (not a video, no audio, bad bbox_shift ...)
    ├── Unauthorized          401  missing or wrong token (403 is mapped here too)
    ├── NotFound              404  unknown job id (or a job of another token)
    ├── NotFinished           409  download of a job that has not completed
    │   └── AvatarNotReady        409  generate by an avatar still being prepared (or whose preparation failed)
    ├── IdempotencyConflict   409  generate: the Idempotency-Key was used for another request
    ├── PayloadTooLarge       413  an upload over the server's limit
    ├── TooManyRequests       429  the queue is full; ``retry_after`` seconds (or None)
    ├── ServerError           5xx
    │   ├── ServiceUnavailable    503  models not loaded / service starting
    │   └── InsufficientStorage   507  the server is out of disk
    ├── ConnectionFailed           the server could not be reached (no status code)
    ├── UnexpectedResponse         a 2xx body that is not what the API sends (wrong URL?)
    ├── JobFailed                  ``wait`` saw the job end failed or cancelled (``.job``)
    ├── AvatarFailed               ``wait_avatar`` saw the preparation fail (``.avatar``)
    ├── WaitTimeout                ``wait`` gave up; also a TimeoutError (``.job``: last seen)
    └── LiveSessionClosed          a live session closed by the server with a code other than 1000 (``.code``)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .models import Avatar, Job


class LipSyncClientError(Exception):
    """Base class. ``message`` is fit for a user; ``status_code`` is the HTTP status, if any."""

    status_code: Optional[int] = None

    def __init__(self, message: str, status_code: Optional[int] = None, *, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.body = body  # the decoded JSON error body, when there was one

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status_code={self.status_code!r})"


class BadRequest(LipSyncClientError):
    status_code = 400


class Unauthorized(LipSyncClientError):
    status_code = 401


class NotFound(LipSyncClientError):
    status_code = 404


class NotFinished(LipSyncClientError):
    status_code = 409


class AvatarNotReady(NotFinished):
    """``generate(avatar_id=...)`` before the avatar is ready (``wait_avatar`` first), or after it failed."""


class IdempotencyConflict(LipSyncClientError):
    """``generate`` with an Idempotency-Key that names another request (or one still being received)."""

    status_code = 409


class PayloadTooLarge(LipSyncClientError):
    status_code = 413


class TooManyRequests(LipSyncClientError):
    status_code = 429

    def __init__(self, message: str, status_code: Optional[int] = 429, *, body: Any = None,
                 retry_after: Optional[float] = None) -> None:
        super().__init__(message, status_code, body=body)
        self.retry_after = retry_after


class ServerError(LipSyncClientError):
    status_code = 500


class ServiceUnavailable(ServerError):
    status_code = 503


class InsufficientStorage(ServerError):
    status_code = 507


class ConnectionFailed(LipSyncClientError):
    """The request never got an HTTP answer (refused, DNS, reset, timed out)."""


class UnexpectedResponse(LipSyncClientError):
    """A successful status with a body this API never sends (is the URL right?)."""


class JobFailed(LipSyncClientError):
    """The job ended ``failed`` or ``cancelled``; ``job`` holds its last status."""

    def __init__(self, job: "Job") -> None:
        reason = job.error or f"job {job.status}"
        super().__init__(f"job {job.job_id} {job.status}: {reason}")
        self.job = job


class AvatarFailed(LipSyncClientError):
    """The avatar's preparation ended ``failed`` or ``cancelled``; ``avatar`` holds its last status."""

    def __init__(self, avatar: "Avatar") -> None:
        super().__init__(f"avatar {avatar.avatar_id} {avatar.status}: {avatar.error or 'preparation ' + avatar.status}")
        self.avatar = avatar


class WaitTimeout(LipSyncClientError, TimeoutError):
    """``wait`` ran out of time; the job keeps running on the server. ``job``: its last status
    (an ``Avatar`` from ``wait_avatar``)."""

    def __init__(self, job: "Job | Avatar", timeout: float) -> None:
        what = f"avatar {job.avatar_id}" if hasattr(job, "avatar_id") else f"job {job.job_id}"
        super().__init__(f"{what} still {job.status} after {timeout:g} s")
        self.job = job
        self.timeout = timeout


_BY_STATUS: dict[int, type[LipSyncClientError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: NotFinished,
    413: PayloadTooLarge,
    429: TooManyRequests,
    503: ServiceUnavailable,
    507: InsufficientStorage,
}


def error_class(status_code: int) -> type[LipSyncClientError]:
    """The exception class for an HTTP error status."""
    if status_code in _BY_STATUS:
        return _BY_STATUS[status_code]
    if status_code >= 500:
        return ServerError
    return LipSyncClientError


class LiveSessionClosed(LipSyncClientError):
    """A live session the server closed abnormally; ``code`` says why (4401 token, 4404 avatar, 4409 avatar
    not ready, 4429 too many sessions, 4408 idle, 4400 bad message, 4503 models not loaded, 1011 error)."""

    def __init__(self, message: str, code: Optional[int]) -> None:
        super().__init__(message)
        self.code = code
