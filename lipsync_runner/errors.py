"""Errors that cross module boundaries, each carrying the HTTP status it maps to.

The service turns these into responses and the CLI into one-line messages, so the
text must be useful to an end user and never contain a traceback or internal path
beyond the file the user named.
"""

from __future__ import annotations


class LipSyncError(Exception):
    """Base class: a failure with a message fit for the user."""

    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(LipSyncError):
    """An upload that is not what it claims to be (not a video, no audio stream, ...)."""

    http_status = 400


class NoFaceError(InvalidInputError):
    """The video has no detectable face in any frame."""


class InputTooLargeError(LipSyncError):
    """An input over a configured size or duration limit."""

    http_status = 413


class UploadTooSlowError(LipSyncError):
    """An upload that stalled or crawled below the minimum transfer rate (it would hold a slot)."""

    http_status = 408


class ModelFilesError(LipSyncError):
    """The models directory is missing a file or holds a broken one."""

    http_status = 503


class MediaProcessingError(LipSyncError):
    """ffmpeg failed on input that passed validation (a codec quirk, a crash, a hang)."""

    http_status = 500


class ProbeTimeoutError(MediaProcessingError):
    """A probe that ran out of time. Files that are costly to read for their size are refused before
    that (size, frame size, header length), so what is left is a server too busy to probe in time:
    503 with Retry-After, not a 500."""

    http_status = 503
    retry_after_s = 30


class JobCancelledError(LipSyncError):
    """The caller asked the pipeline to stop; nothing was written."""

    http_status = 409


class JobNotFoundError(LipSyncError):
    """No such job (or an id that is not a well-formed job id, or another owner's job)."""

    http_status = 404


class NoCredentialsError(LipSyncError):
    """The caller's completed job whose result carries no content credentials (off, or a webm output)."""

    http_status = 404


class JobNotFinishedError(LipSyncError):
    """The job has no result yet (or failed / was cancelled): nothing to download."""

    http_status = 409


class AvatarNotFoundError(JobNotFoundError):
    """No such avatar (unknown, malformed, another owner's, deleted or expired)."""


class AvatarNotReadyError(JobNotFinishedError):
    """A generate named an avatar that is still being prepared (Retry-After), or whose preparation failed."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelsNotReadyError(LipSyncError):
    """The GPU runner has not loaded its models (yet, or it failed to)."""

    http_status = 503


class QueueFullError(LipSyncError):
    """Admission control: too many queued jobs; retry later."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: int = 30) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InsufficientStorageError(LipSyncError):
    """The data directory is below its free-space floor."""

    http_status = 507
