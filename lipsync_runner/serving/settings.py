"""Settings of the BentoML services, from the environment (documented in the README)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Job records (SQLite) and job files.")
    job_workers: int = Field(default=4, ge=1, le=64, description="Jobs processed at once (CPU side).")
    retention_hours: float = Field(default=24.0, gt=0, description="Finished jobs are removed after this.")
    sweep_interval_s: float = Field(default=300.0, gt=0)
    max_attempts: int = Field(default=2, ge=1, description="Starts of a job, counting restarts of the server.")
    max_queued_jobs: int = Field(default=100, ge=1, description="Beyond this, generate answers 429.")
    free_space_floor_mb: int = Field(default=1024, ge=0, description="Refuse new jobs below this free space.")
    debug: bool = Field(default=False, description="Tracebacks and internal messages in error responses.")
    avatar_cache: bool = Field(default=True, description="Reuse face tracks and latents of videos seen before.")
    avatar_cache_dir: Path | None = Field(default=None, description="Default: <data_dir>/avatars.")
    avatar_cache_gb: float = Field(default=20.0, gt=0, description="Size bound of the avatar cache (LRU).")

    # More than one machine: every API replica shares one job store and one bucket (README).
    database_url: SecretStr | None = Field(
        default=None, description="postgresql://user:password@host/db: the job store (and queue) all replicas "
                                  "share. Default: SQLite in the data directory, one process.")
    storage_url: str | None = Field(
        default=None, description="s3://bucket/prefix: job inputs and outputs in a bucket (AWS_* credentials). "
                                  "Default: the data directory.")
    s3_endpoint_url: str | None = Field(default=None, description="An S3-compatible store (MinIO, GCS, ...).")
    presigned_downloads: bool = Field(default=False, description="Downloads redirect (307) to a presigned "
                                                                 "bucket URL instead of streaming through the API.")
    presigned_expiry_s: int = Field(default=3600, ge=60, le=7 * 86400, description="Lifetime of a presigned URL.")
    lease_s: float = Field(default=30.0, ge=1, le=3600, description="A running job's lease: a replica that dies "
                                                                    "loses its jobs to the others after this.")
    queue_poll_s: float = Field(default=1.0, gt=0, le=60, description="Idle workers look at the shared queue this "
                                                                      "often.")

    # GPU runner: adaptive batching (read when service.py is imported: decorator arguments)
    max_batch_size: int = Field(default=64, ge=2, description="Frames per GPU batch at most.")
    # BentoML's batcher cancels a request that waited longer than this, and the caller only sees
    # a 500. Under load (many jobs, a queue of chunks) that killed jobs; with the runner's own
    # timeout as the bound, a busy GPU means waiting, not failing.
    max_latency_ms: int = Field(default=600_000, ge=10, description="Longest a request may wait in the batcher.")
    chunk_frames: int = Field(default=8, ge=1, le=256, description="Frames a job sends per runner call.")
    runner_timeout_s: float = Field(default=600.0, gt=0)

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600
