"""What a job is: its states and the record kept for it."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from enum import Enum

from pydantic import BaseModel, Field

from lipsync_runner.params import JobParams

# uuid4 in canonical form; anything else is "not found" without touching the filesystem
def new_job_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class JobStatus(str, Enum):
    queued = "queued"
    processing = "processing"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class JobKind(str, Enum):
    job = "job"  # a lip-sync job: a video and an audio in, a video out
    avatar = "avatar"  # a video prepared once (face track, latents) for jobs by avatar_id; no output


class JobRecord(BaseModel):
    job_id: str
    kind: JobKind = JobKind.job  # avatars share the store, queue, owner scoping, cancel and retention
    status: JobStatus = JobStatus.queued
    stage: str = "queued"  # finer than status: audio, faces, generate, encode, done ...
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    params: JobParams = Field(default_factory=JobParams)
    owner: str | None = None  # a token's fingerprint when jobs are scoped per token
    video_filename: str  # the user's file names, for display only (never used as paths)
    audio_filename: str | None  # None: an avatar (no audio)
    video_file: str  # file names inside the job's directory
    audio_file: str | None
    output_file: str | None = None  # set when completed
    error: str | None = None
    frames: int | None = None
    avatar_cache: str | None = None  # "hit" or "miss" when the job used the avatar cache
    media: dict | None = None  # what admission learnt of the inputs: durations, size, fps (api/admission.py)
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage, plus queue/total
    faces: dict | None = None  # the face tracks found, who was dubbed (faces.FaceTracks.summary); when completed
    live: dict | None = None  # progressive output published so far: {"seconds": float, "ended": bool}
    attempts: int = 0  # times a worker started it (restarts re-queue)
    # The queue's bookkeeping (any replica may run any job): while 'processing', the job is held
    # by one worker whose lease it renews; past lease_expires_at any replica may take it again.
    lease_owner: str | None = None  # "<host>:<pid>:<random>" of the holder (when finished: of the last one)
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False  # cancel() on any replica; the worker holding the job stops
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    completed_at: datetime | None = None  # any terminal state
    expires_at: datetime | None = None  # when the sweeper removes it
