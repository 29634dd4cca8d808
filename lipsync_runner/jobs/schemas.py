"""Response bodies of the REST API (field names follow the seed guide).

Timestamps are ISO 8601 in UTC with their zone (``2026-02-10T12:00:00Z``): the seed's form
plus the ``Z`` that says which time it is. ``output_path`` is the name the result downloads
as (``lip_sync_<job_id>.mp4``, ``.webm`` for a webm job), never a server path. Progress is rounded to 0.1 %.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from lipsync_runner.inputs.reference import is_avatar_reference, is_reference
from lipsync_runner.jobs.records import JobRecord, JobStatus
from lipsync_runner.params import WebhookEvent, avatar_fields

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
DEFAULT_URL_PREFIX = "/api/lip-sync"
PROGRESS_DIGITS = 3


def format_time(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # records are always aware; a naive value is UTC by convention
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime(TIME_FORMAT)


def round_progress(value: float) -> float:
    return round(float(value), PROGRESS_DIGITS)


def download_name(job_id: str, output_format: str = "mp4") -> str:
    return f"lip_sync_{job_id}.{output_format}"


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, fit for the user.")
    details: Optional[str] = Field(default=None, description="More detail, where there is any.")
    message: Optional[str] = Field(default=None, description="413 only: the limit that was exceeded.")


class HealthResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = Field(description="'ready' when jobs can run; anything else means not ready (HTTP 503).")
    models_loaded: bool
    device: Optional[str] = None
    model_version: Optional[str] = Field(default=None, description="The MuseTalk version the runner loaded.")
    error: Optional[str] = None


class GenerateAccepted(BaseModel):
    success: bool = True
    job_id: str
    status: JobStatus = Field(description="'queued' (or the current status when a wait timed out).")
    message: str
    status_url: str
    download_url: str
    output_path: Optional[str] = Field(default=None, description="Always null here: the job has not finished.")


class GenerateResult(BaseModel):
    """The seed's synchronous body, for ``wait=true``: HTTP 200 whether the job succeeded or not."""

    success: bool
    job_id: str
    status: JobStatus
    message: str = Field(description="'Lip sync completed successfully', or why the job failed.")
    output_path: Optional[str] = Field(default=None, description="Download file name when completed.")
    download_url: Optional[str] = None
    status_url: str
    error: Optional[str] = None


class JobInputs(BaseModel):
    """What the job was given: the user's file names, durations, and where to look at them."""

    video_filename: str
    audio_filename: str
    video_duration_s: Optional[float] = None
    audio_duration_s: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[str] = Field(default=None, description="Exact frame rate as a fraction, e.g. 30000/1001.")
    video_url: str = Field(description="GET: the uploaded video, for playback")
    audio_url: str = Field(description="GET: the uploaded audio, for playback")
    thumbnail_url: str = Field(description="GET: a JPEG of the video's first frame")
    video_source: str = Field(default="upload", description="upload; url: given as video_url and fetched by the "
                              "worker (playback and thumbnail once fetched); avatar: the avatar's video (avatar_id)")
    audio_source: str = Field(default="upload", description="upload, or url (audio_url)")

    @classmethod
    def from_record(cls, record: JobRecord, prefix: str) -> "JobInputs":
        video = (record.media or {}).get("video", {})
        audio = (record.media or {}).get("audio", {})
        base = f"{prefix}/jobs/{record.job_id}"
        return cls(video_filename=record.video_filename, audio_filename=record.audio_filename,
                   video_duration_s=video.get("duration_s"), audio_duration_s=audio.get("duration_s"),
                   width=video.get("width"), height=video.get("height"), fps=video.get("fps"),
                   video_url=f"{base}/inputs/video", audio_url=f"{base}/inputs/audio",
                   thumbnail_url=f"{base}/thumbnail.jpg",
                   video_source="url" if is_reference(record.video_file) else
                   "avatar" if is_avatar_reference(record.video_file) else "upload",
                   audio_source="url" if is_reference(record.audio_file) else "upload")


class WebhookDeliveryStatus(BaseModel):
    """One webhook delivery as the job's status shows it."""

    event: WebhookEvent
    event_id: str = Field(description="Also the Lipsync-Event-Id header: the same on every retry.")
    state: str = Field(description="pending, delivered, or failed (given up)")
    attempts: int
    last_status: Optional[int] = Field(default=None, description="The receiver's HTTP status at the last attempt.")
    last_error: Optional[str] = None
    delivered_at: Optional[str] = None
    next_attempt_at: Optional[str] = Field(default=None, description="ISO 8601, UTC; when pending.")


class Progressive(BaseModel):
    """How far a job's progressive output goes (the web page plays ``playlist`` while the job runs)."""

    playlist: str = Field(description="The HLS playlist (fMP4 segments) of the video rendered so far; the same "
                                      "auth as the job's other reads.")
    playable_seconds: float = Field(description="Seconds of video the listed segments hold.")
    ended: bool = Field(description="The playlist is final (#EXT-X-ENDLIST): the job finished, failed or was "
                                    "cancelled.")

    @classmethod
    def from_record(cls, record: JobRecord, url_prefix: str) -> Optional["Progressive"]:
        live = record.live
        if not live:
            return None
        return cls(playlist=f"{url_prefix}/jobs/{record.job_id}/live.m3u8",
                   playable_seconds=round(float(live.get("seconds", 0.0)), 3), ended=bool(live.get("ended")))


class JobStatusResponse(BaseModel):
    job_id: str
    status: JobStatus
    created_at: Optional[str] = Field(description="ISO 8601, UTC: YYYY-MM-DDTHH:MM:SSZ")
    completed_at: Optional[str] = Field(default=None, description="ISO 8601, UTC; set in any terminal state.")
    output_path: Optional[str] = Field(default=None, description="Download file name when completed.")
    stage: str
    progress: float = Field(ge=0.0, le=1.0)
    error: Optional[str] = None
    download_url: str
    frames: Optional[int] = None
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage, plus queue/total.")
    attempts: int = 0
    expires_at: Optional[str] = Field(default=None, description="ISO 8601, UTC; when the job's files are removed.")
    bbox_shift: int = 0
    params: dict[str, Any] = Field(default_factory=dict, description="The job's parameters (see GET /params).")
    inputs: JobInputs
    avatar_cache: Optional[str] = Field(default=None, description="hit: the video was prepared before; miss; "
                                        "null: no cache or not finished")
    faces: Optional[dict[str, Any]] = Field(
        default=None, description="When completed: the people found in the video, as face tracks. count; "
                                  "frames; chosen (the track ids dubbed); tracks (at most 32: the chosen ones "
                                  "and those seen longest), each {id, first_frame, last_frame, frames, box: "
                                  "mean crop box [x1, y1, x2, y2]}. A track id is a `face` for a later job on "
                                  "the same video.")
    queue_position: Optional[int] = Field(default=None, description="Queued jobs: 1 for the job that starts next.")
    eta_s: Optional[float] = Field(default=None, description="Queued or processing: expected seconds until the job "
                                   "finishes, from recent throughput; null until there is any.")
    webhooks: Optional[list[WebhookDeliveryStatus]] = Field(
        default=None, description="With webhook_url: each delivery (event, state, attempts, last_status, ...).")
    progressive: Optional[Progressive] = Field(
        default=None, description="Once the first segment of the video is playable: its HLS playlist, how many "
                                  "seconds it holds and whether it has ended; null before (and for jobs whose "
                                  "output is not H.264 MP4).")

    @classmethod
    def from_record(cls, record: JobRecord, download_url: str, **extras: Any) -> "JobStatusResponse":
        """``extras``: queue_position, eta_s, webhooks (api/integration.py `status_extras`)."""
        return cls(
            job_id=record.job_id,
            status=record.status,
            created_at=format_time(record.created_at),
            completed_at=format_time(record.completed_at),
            output_path=download_name(record.job_id, record.params.output_format) if record.status == JobStatus.completed else None,
            stage=record.stage,
            progress=round_progress(record.progress),
            error=record.error,
            download_url=download_url,
            frames=record.frames,
            timings=dict(record.timings),
            attempts=record.attempts,
            expires_at=format_time(record.expires_at),
            bbox_shift=record.params.bbox_shift,
            params=record.params.model_dump(mode="json"),
            inputs=JobInputs.from_record(record, download_url.rsplit("/download/", 1)[0]),
            avatar_cache=record.avatar_cache,
            faces=record.faces,
            progressive=Progressive.from_record(record, download_url.rsplit("/download/", 1)[0]),
            **extras,
        )


class JobSummary(BaseModel):
    job_id: str
    status: JobStatus
    created_at: Optional[str]
    completed_at: Optional[str] = None
    stage: str
    progress: float
    inputs: JobInputs

    @classmethod
    def from_record(cls, record: JobRecord, url_prefix: str = DEFAULT_URL_PREFIX) -> "JobSummary":
        return cls(
            job_id=record.job_id,
            status=record.status,
            created_at=format_time(record.created_at),
            completed_at=format_time(record.completed_at),
            stage=record.stage,
            progress=round_progress(record.progress),
            inputs=JobInputs.from_record(record, url_prefix.rstrip("/")),
        )


class JobListResponse(BaseModel):
    total: int
    jobs: list[JobSummary]


class AvatarAccepted(BaseModel):
    success: bool = True
    avatar_id: str = Field(description="Give it to generate as avatar_id once the avatar's status is completed.")
    status: JobStatus
    message: str
    status_url: str


class AvatarVideo(BaseModel):
    filename: str = Field(description="The user's name of the video (or the last part of its URL).")
    source: str = Field(description="upload, or url (video_url, fetched by the worker)")
    duration_s: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    fps: Optional[str] = Field(default=None, description="Exact frame rate as a fraction, e.g. 30000/1001.")


class AvatarStatusResponse(BaseModel):
    """An avatar: a video prepared once (face track and latents) for any number of generates by avatar_id."""

    avatar_id: str
    status: JobStatus = Field(description="queued, processing, completed (ready for generate), failed or cancelled")
    ready: bool = Field(description="true once completed: generate takes avatar_id")
    stage: str
    progress: float = Field(ge=0.0, le=1.0)
    error: Optional[str] = None
    created_at: Optional[str] = Field(description="ISO 8601, UTC")
    completed_at: Optional[str] = None
    expires_at: Optional[str] = Field(default=None, description="ISO 8601, UTC: when the avatar is removed (each "
                                      "generate by avatar_id keeps it for another retention period)")
    frames: Optional[int] = Field(default=None, description="Frames of the video (prepared once ready).")
    params: dict[str, Any] = Field(default_factory=dict, description="The preparation's parameters (bbox_shift, "
                                   "the face choice): every generate by avatar_id uses these.")
    faces: Optional[dict[str, Any]] = Field(default=None, description="When ready: the people found and who is "
                                            "dubbed, as a job status' `faces`.")
    video: AvatarVideo
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage, plus queue/total.")
    status_url: str
    thumbnail_url: str
    queue_position: Optional[int] = Field(default=None, description="Queued: 1 for the next to start (avatars and "
                                          "jobs share the queue).")
    eta_s: Optional[float] = Field(default=None, description="Queued or processing: expected seconds to ready.")

    @classmethod
    def from_record(cls, record: JobRecord, url_prefix: str = DEFAULT_URL_PREFIX,
                    **extras: Any) -> "AvatarStatusResponse":
        """``extras``: queue_position, eta_s (api/integration.py `status_extras`)."""
        media = (record.media or {}).get("video", {})
        prefix = url_prefix.rstrip("/")
        return cls(
            avatar_id=record.job_id, status=record.status, ready=record.status is JobStatus.completed,
            stage=record.stage, progress=round_progress(record.progress), error=record.error,
            created_at=format_time(record.created_at), completed_at=format_time(record.completed_at),
            expires_at=format_time(record.expires_at), frames=record.frames, faces=record.faces,
            params={name: value for name, value in record.params.model_dump(mode="json").items()
                    if name in avatar_fields()},
            video=AvatarVideo(filename=record.video_filename,
                              source="url" if is_reference(record.video_file) else "upload",
                              duration_s=media.get("duration_s"), width=media.get("width"),
                              height=media.get("height"), fps=media.get("fps")),
            timings=dict(record.timings), status_url=f"{prefix}/avatars/{record.job_id}",
            thumbnail_url=f"{prefix}/jobs/{record.job_id}/thumbnail.jpg",
            **{k: v for k, v in extras.items() if k in ("queue_position", "eta_s")})


class AvatarListResponse(BaseModel):
    total: int
    avatars: list[AvatarStatusResponse]


class AvatarDeleted(BaseModel):
    success: bool = True
    avatar_id: str
    message: str = "Avatar and its prepared data removed"


class CleanupResponse(BaseModel):
    success: bool = True
    job_id: str
    message: str = "Job files removed"


def status_body(record: JobRecord, url_prefix: str = DEFAULT_URL_PREFIX) -> dict[str, Any]:
    """The ``/status`` body of a job as plain JSON data (for callers outside the REST app)."""
    url = f"{url_prefix.rstrip('/')}/download/{record.job_id}"
    return JobStatusResponse.from_record(record, url).model_dump(mode="json")


def job_summary(record: JobRecord, url_prefix: str = DEFAULT_URL_PREFIX) -> dict[str, Any]:
    """One ``/jobs`` entry as plain JSON data."""
    return JobSummary.from_record(record, url_prefix).model_dump(mode="json")
