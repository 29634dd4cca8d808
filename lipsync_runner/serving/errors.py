"""LipSyncError -> the BentoML exception that carries the same HTTP status and message."""

from __future__ import annotations

import asyncio
import functools
from http import HTTPStatus

from ..errors import LipSyncError


def as_bentoml_error(exc: LipSyncError):
    from bentoml.exceptions import BentoMLException

    return BentoMLException(exc.message, error_code=HTTPStatus(exc.http_status))


def bentoml_errors(func):
    """Decorator for BentoML APIs: our errors keep their HTTP status and message."""
    if asyncio.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_wrapper(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except LipSyncError as exc:
                raise as_bentoml_error(exc) from None

        return async_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except LipSyncError as exc:
            raise as_bentoml_error(exc) from None

    return wrapper
