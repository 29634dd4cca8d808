"""One error vocabulary for every surface: JSON bodies, one wording per condition.

Every error answer is ``{"error": "..."}`` (plus ``details`` for 503 and ``message`` for
the seed's 413 body). The REST routes, BentoML's own endpoints and the paths neither knows
all answer through `error_response`, so a condition reads the same wherever it happens.
"""

from __future__ import annotations

from typing import Any

from lipsync_runner.errors import (
    AvatarNotFoundError,
    InputTooLargeError,
    JobNotFoundError,
    LipSyncError,
    ModelsNotReadyError,
    QueueFullError,
)
from lipsync_runner.api.limits import too_large_body

JOB_NOT_FOUND = "Job not found"
AVATAR_NOT_FOUND = "Avatar not found"
NOT_FOUND = "Not found"
METHOD_NOT_ALLOWED = "Method not allowed"
UNAUTHORIZED = "Missing or invalid API token"
INTERNAL = "Internal server error"
SERVICE_UNAVAILABLE = "Lip sync service not available"

#: Plain-text bodies of the frameworks underneath, and ours for them.
_GENERIC = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 500: INTERNAL}


def error_body(exc: LipSyncError) -> dict[str, Any]:
    if isinstance(exc, InputTooLargeError):
        return too_large_body(exc.message)
    if isinstance(exc, ModelsNotReadyError):
        return {"error": SERVICE_UNAVAILABLE, "details": exc.message}
    if isinstance(exc, AvatarNotFoundError):
        return {"error": AVATAR_NOT_FOUND}  # never say why, as for jobs
    if isinstance(exc, JobNotFoundError):
        return {"error": JOB_NOT_FOUND}  # never say why (unknown, malformed, someone else's)
    return {"error": exc.message}


def error_headers(exc: LipSyncError) -> dict[str, str]:
    """``Retry-After`` for an error that says when to come back (429 queue full, 409 key in progress)."""
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, QueueFullError) or retry_after is not None:
        return {"Retry-After": str(max(1, int(retry_after or 1)))}
    return {}


def generic_error(status: int, detail: str | None = None) -> dict[str, str]:
    """The body for a framework's own error (an unknown path, a wrong method)."""
    if status in _GENERIC and (detail is None or detail.strip().lower() in
                               {"not found", "method not allowed", "internal server error"}):
        return {"error": _GENERIC[status]}
    return {"error": detail or _GENERIC.get(status, "Request failed")}
