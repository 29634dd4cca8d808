"""Errors of BentoML endpoints answered exactly as the REST routes answer them.

BentoML would wrap an exception's message as `[{"error": ...}]`, lose `details`, `message`
and `Retry-After`, and hide 5xx messages. An endpoint wrapped with `bentoml_errors` returns
the REST route's own JSON response instead (BentoML passes a returned Response through).
"""

from __future__ import annotations

import asyncio
import functools

from lipsync_runner.api.errors import error_body, error_headers
from lipsync_runner.errors import LipSyncError


def error_response(exc: LipSyncError, ctx=None):
    """The REST route's answer to `exc`. BentoML stamps the context's status code on whatever an
    endpoint with a context returns, so the context is told the status too."""
    from starlette.responses import JSONResponse

    if ctx is not None:
        ctx.response.status_code = exc.http_status
    return JSONResponse(error_body(exc), status_code=exc.http_status, headers=error_headers(exc))


def as_bentoml_error(exc: LipSyncError):
    """For endpoints of the runner (called by our own code, not users): keep status and message."""
    from http import HTTPStatus

    from bentoml.exceptions import BentoMLException

    return BentoMLException(exc.message, error_code=HTTPStatus(exc.http_status))


def bentoml_errors(func):
    """Decorator for the API service's BentoML endpoints: our errors answer like the REST routes."""
    if asyncio.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_wrapper(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except LipSyncError as exc:
                return error_response(exc, kwargs.get("ctx"))

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LipSyncError as exc:
            raise as_bentoml_error(exc) from None

    return wrapper
