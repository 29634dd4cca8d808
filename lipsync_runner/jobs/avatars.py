"""Avatars (issue 14 item 6): a video prepared once (face track, VAE latents), dubbed many times.

An avatar is a job record of kind ``avatar`` (jobs/records.py), so it has what jobs have: it
is admitted through the one admission path (a video upload or ``video_url``, plus the
parameters that shape the preparation, ``params.avatar_fields``), queued and run by the job
manager (the worker prepares it: ``pipeline.prepare_avatar``, into an avatar-cache entry the
avatar pins), scoped to its owner, deleted like a job (cleanup: a running preparation is
cancelled) and removed with the retention setting. Its video stays in its own directory.

A generate by ``avatar_id`` names an avatar that must be the caller's (404) and ready (409).
The job's video is an avatar reference (inputs/reference.py) that the worker resolves to the
avatar's stored video; the avatar's parameters replace the job's (400 when the request gave
another value), so the job's cache key is the avatar's and the job skips face tracking and
VAE encoding. Each use keeps the avatar for another retention period.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lipsync_runner.errors import AvatarNotFoundError, AvatarNotReadyError, InvalidInputError, JobNotFoundError
from lipsync_runner.inputs.reference import fetched_file, is_reference
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus
from lipsync_runner.jobs.front import Manager
from lipsync_runner.params import is_job_id
from lipsync_runner.params import JobParams, avatar_fields
from lipsync_runner.media.thumbnails import THUMBNAIL_NAME

NOT_READY_RETRY_S = 5
DISABLED = "This server keeps no avatars (the avatar cache is off: LIP_SYNC_AVATAR_CACHE=false)"


def find_avatar(manager: Manager, avatar_id: str, owner: str | None) -> JobRecord:
    """The caller's avatar; AvatarNotFoundError (404) for anything else (a job's id included)."""
    if not isinstance(avatar_id, str) or not is_job_id(avatar_id):
        raise AvatarNotFoundError("Avatar not found")
    try:
        record = manager.get(avatar_id, owner)
    except JobNotFoundError:
        raise AvatarNotFoundError("Avatar not found") from None
    if record.kind is not JobKind.avatar:
        raise AvatarNotFoundError("Avatar not found")
    return record


def ready_avatar(manager: Manager, avatar_id: str, owner: str | None) -> JobRecord:
    """The caller's avatar if it is ready; 409 while it is being prepared (Retry-After) or if that failed."""
    record = find_avatar(manager, avatar_id, owner)
    if record.status is JobStatus.completed:
        return record
    if not record.status.finished:
        raise AvatarNotReadyError(
            f"avatar {avatar_id} is not ready yet ({record.status.value}, {record.stage} {record.progress:.0%}); "
            "retry when its status is completed", retry_after_s=NOT_READY_RETRY_S)
    raise AvatarNotReadyError(f"avatar {avatar_id} cannot be used: its preparation {record.status.value}"
                              f"{': ' + record.error if record.error else ''}; create it again")


def stored_name(manager: Manager, record: JobRecord, owner: str | None) -> str:
    """The name of the avatar's stored video among its files (the fetched file when it came from video_url)."""
    name = record.video_file
    if is_reference(name):
        reference = manager.input_path(record.job_id, name, owner)
        name = fetched_file(reference.parent, name) or ""
    return name


def stored_video(manager: Manager, record: JobRecord, owner: str | None) -> Path:
    """The avatar's stored video as a local file."""
    try:
        return manager.input_path(record.job_id, stored_name(manager, record, owner), owner)
    except JobNotFoundError:
        raise AvatarNotFoundError("Avatar not found") from None


def stored_thumbnail(manager: Manager, record: JobRecord, owner: str | None) -> Path | None:
    """The avatar's thumbnail as a local file (from wherever its files are stored), or None without one."""
    try:
        return manager.input_path(record.job_id, THUMBNAIL_NAME, owner)
    except (JobNotFoundError, FileNotFoundError):
        return None


def inherit(params: JobParams, avatar: JobRecord, given: Iterable[str]) -> JobParams:
    """The job's parameters with the avatar's preparation parameters; 400 for a different one given."""
    given = set(given)
    updates = {}
    for name in avatar_fields():
        theirs = getattr(avatar.params, name)
        if name in given and getattr(params, name) != theirs:
            raise InvalidInputError(
                f"Invalid parameters: {name}: avatar {avatar.job_id} was prepared with {name}={theirs!r}; leave "
                f"{name} out, or create an avatar with {name}={getattr(params, name)!r}")
        updates[name] = theirs
    return params.model_copy(update=updates)
