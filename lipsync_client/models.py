"""Response bodies of the lip-sync REST API as pydantic models.

They mirror the server's JSON and accept fields added later (``extra="allow"``).
Timestamps arrive as ISO 8601 in UTC (``YYYY-MM-DDTHH:MM:SSZ``) and become timezone-aware datetimes.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

QUEUED, PROCESSING, COMPLETED, FAILED, CANCELLED = "queued", "processing", "completed", "failed", "cancelled"
FINISHED_STATUSES = frozenset({COMPLETED, FAILED, CANCELLED})


def _utc(value: Optional[datetime]) -> Optional[datetime]:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (what ``lipsync ... --json`` prints)."""
        return self.model_dump(mode="json")


class _Timestamps(_Body):
    @field_validator("created_at", "completed_at", "expires_at", check_fields=False)
    @classmethod
    def _as_utc(cls, value: Optional[datetime]) -> Optional[datetime]:
        return _utc(value)


class Job(_Timestamps):
    """A job, as ``GET /status/<id>`` describes it (``generate`` fills what it knows)."""

    job_id: str
    status: str = Field(description="queued, processing, completed, failed or cancelled")
    stage: str = ""
    progress: float = 0.0
    error: Optional[str] = None
    created_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    expires_at: Optional[datetime] = None
    output_path: Optional[str] = Field(default=None, description="The file name the result downloads as.")
    download_url: Optional[str] = None
    status_url: Optional[str] = None
    frames: Optional[int] = None
    timings: dict[str, float] = Field(default_factory=dict)
    attempts: int = 0
    bbox_shift: Optional[int] = None
    message: Optional[str] = None
    queue_position: Optional[int] = Field(default=None, description="Queued: 1 for the job that starts next.")
    eta_s: Optional[float] = Field(default=None, description="Queued or processing: expected seconds to the end.")
    webhooks: Optional[list["WebhookDelivery"]] = Field(default=None, description="Each webhook delivery's outcome.")
    progressive: Optional["Progressive"] = Field(default=None, description="While it renders (and after): the HLS "
                                                 "playlist of the video so far, and how far it goes.")

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def failed(self) -> bool:
        """Ended without a result: failed or cancelled."""
        return self.status in (FAILED, CANCELLED)


class Progressive(_Body):
    """A job's progressive output: an HLS playlist of fMP4 segments that grows as the job renders."""

    playlist: str = Field(description="URL path of the playlist (same auth as the job).")
    playable_seconds: float = 0.0
    ended: bool = Field(default=False, description="The playlist is final (#EXT-X-ENDLIST).")


class WebhookDelivery(_Body):
    """One webhook delivery of a job (``Job.webhooks``)."""

    event: str
    event_id: str
    state: str = Field(description="pending, delivered, or failed (given up)")
    attempts: int = 0
    last_status: Optional[int] = None
    last_error: Optional[str] = None
    delivered_at: Optional[datetime] = None
    next_attempt_at: Optional[datetime] = None


class JobSummary(_Timestamps):
    """One entry of ``GET /jobs``."""

    job_id: str
    status: str
    stage: str = ""
    progress: float = 0.0
    created_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None


class JobList(_Body):
    total: int
    jobs: list[JobSummary]


class Health(_Body):
    """``GET /health``. ``ready`` is true when the service can run jobs (HTTP 200)."""

    status: str
    models_loaded: bool = False
    device: Optional[str] = None
    model_version: Optional[str] = None
    error: Optional[str] = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"


class UsageDay(_Body):
    date: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    output_seconds: float = 0.0
    frames: int = 0


class Usage(_Body):
    """``GET /usage``: the caller's own jobs, output seconds and frames, by UTC day."""

    since: str
    until: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    output_seconds: float = 0.0
    frames: int = 0
    days: list[UsageDay] = Field(default_factory=list)


class Avatar(_Timestamps):
    """An avatar (``POST /avatars``): a video prepared once, then dubbed by ``generate(avatar_id=...)``."""

    avatar_id: str
    status: str = Field(description="queued, processing, completed (ready), failed or cancelled")
    ready: bool = False
    stage: str = ""
    progress: float = 0.0
    error: Optional[str] = None
    created_at: Optional[datetime] = None
    completed_at: Optional[datetime] = None
    expires_at: Optional[datetime] = None
    frames: Optional[int] = None
    params: dict[str, Any] = Field(default_factory=dict, description="What every generate by it uses (bbox_shift).")
    video: dict[str, Any] = Field(default_factory=dict, description="filename, source, duration_s, width, height, fps")
    timings: dict[str, float] = Field(default_factory=dict)
    status_url: Optional[str] = None
    message: Optional[str] = None
    queue_position: Optional[int] = None
    eta_s: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    @property
    def failed(self) -> bool:
        return self.status in (FAILED, CANCELLED)


class AvatarList(_Body):
    total: int
    avatars: list[Avatar]


class AvatarDeleted(_Body):
    success: bool = True
    avatar_id: str
    message: str = ""


class CleanupResult(_Body):
    success: bool = True
    job_id: str
    message: str = ""


Job.model_rebuild()


class Preview(BaseModel):
    """POST /preview's answer: the stretch (an MP4 with its sound, or a JPEG strip of its frames side by
    side), who was found and dubbed (as a job status' ``faces``), and where the stretch lies."""

    content: bytes
    media_type: str  # video/mp4 or image/jpeg
    faces: Optional[dict[str, Any]] = None
    start: float  # seconds of the output
    end: float

    def save(self, path: "str | Path") -> Path:
        target = Path(path).expanduser()
        target.write_bytes(self.content)
        return target
