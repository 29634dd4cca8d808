"""LipSyncError -> the BentoML exception that carries the same HTTP status and message."""

from __future__ import annotations

from http import HTTPStatus

from ..errors import LipSyncError


def as_bentoml_error(exc: LipSyncError):
    from bentoml.exceptions import BentoMLException

    return BentoMLException(exc.message, error_code=HTTPStatus(exc.http_status))
