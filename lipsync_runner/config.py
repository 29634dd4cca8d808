"""Every setting of the service, in one tree, read from the environment in this one module.

Each section is a pydantic-settings class with the ``LIP_SYNC_`` prefix (the seed guide's names,
``MUSETALK_MODELS_DIR`` among them, so existing deployments keep working); :class:`Settings` holds
them all. ``docs/configuration.md`` is generated from here (``python -m lipsync_runner.config``)
and a test fails when the two differ.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
# Room for the multipart framing and the small text fields on top of the two files.
MULTIPART_OVERHEAD_BYTES = 1 * MiB


def available_cores(cgroup_root: Path | str = "/sys/fs/cgroup") -> int:
    """The cores this replica may use: its CPU affinity, bounded by a cgroup CPU quota (a container's
    ``--cpus`` or a pod's CPU limit: cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), at least 1.
    ``os.cpu_count()`` would count the node's cores, not the container's."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    root = Path(cgroup_root)
    quota = period = None
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            quota, period = float(text[0]), float(text[1])
    except (OSError, ValueError, IndexError):
        try:
            q = float((root / "cpu" / "cpu.cfs_quota_us").read_text())
            if q > 0:
                quota, period = q, float((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            pass
    if quota and period:
        cores = min(cores, math.ceil(quota / period))
    return max(1, cores)


def job_workers_for(cores: int) -> int:
    """Jobs a replica runs at once: one per two cores (a job keeps about two busy: decode, faces, blend
    and x264 overlap), at least 2 so that one long job never holds the replica alone."""
    return max(2, cores // 2)


def x264_threads_for(cores: int, job_workers: int) -> int:
    """x264 threads per job: the job's share of the cores (cores / job workers), 2 to 4. x264's own
    choice (1.5 per core of the node) oversubscribes a node that runs many jobs; 2 threads cost the
    least CPU per frame on 2 cores (docs/benchmarks.md)."""
    return max(2, min(4, cores // max(1, job_workers)))


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated setting's items (tokens, secrets, hosts), blanks dropped."""
    return tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))


class RunnerSettings(BaseSettings):
    """The inference core: models, device, face detection, encoding, speech activity (CLI and GPU runner)."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    models_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("MUSETALK_MODELS_DIR", "LIP_SYNC_MODELS_DIR"),
        description="MuseTalk models directory (musetalkV15/, sd-vae/, whisper/, ...).",
    )
    device: str = Field(default="auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    bbox_shift: int = Field(default=0, ge=-100, le=100, description="MuseTalk v1.0 mouth-box shift in pixels: the default of jobs that do not give one (v1.5 ignores it).")
    batch_size: int = Field(default=8, ge=1, le=512, description="Frames per model call.")
    model_version: Literal["auto", "v15", "v1"] = Field(default="auto", description="MuseTalk UNet version; auto: "
                                                        "v1.5 when its weights are present, else v1.")
    face_detector: Literal["auto", "haar", "fan", "mediapipe"] = Field(
        default="auto", description="auto: S3FD+FAN when its weights are in the models directory, else MediaPipe, "
                                    "else OpenCV Haar.")
    extra_margin: int = Field(default=10, ge=0, le=100, description="v1.5: pixels added below the chin.")
    crf: int = Field(default=18, ge=0, le=51, description="x264 quality of the output video.")
    preset: str = Field(default="veryfast", description="x264 preset of the output video.")
    ffmpeg_timeout_s: float = Field(default=3600.0, gt=0, description="Upper bound for one ffmpeg process.")
    compile: bool = Field(default=False, description="torch.compile the UNet and VAE decoder (CUDA only; needs a C "
                                                     "compiler, which the image has: the runner refuses to load "
                                                     "without one).")
    runner_model: Literal["musetalk", "timed"] = Field(
        default="musetalk", description="musetalk: the real networks; timed: a stand-in whose calls take the time one "
                                        "H100 would and compute nothing (models/timed.py), to measure the API side "
                                        "without a GPU (bench/bench_feed.py).")
    timed_efficiency: float = Field(default=0.5, gt=0, le=1, description="timed runner: the share of the H100's "
                                    "790 TFLOP/s (bf16) that MuseTalk's networks are assumed to reach.")
    x264_threads: int = Field(
        default=0, ge=0, le=64,
        description="x264 threads per job; 0: derived from the replica's cores (cgroup-aware): cores / job workers, "
                    "2 to 4. 2 costs 13-28 % less CPU per frame than x264's own choice on a 2-core machine "
                    "(docs/benchmarks.md).")
    face_detector_device: str = Field(
        default="auto", description="Where S3FD+FAN run: cpu, cuda, cuda:N, or auto (cuda when the FAN weights are "
                                    "present and a CUDA GPU is visible, else cpu). Haar and MediaPipe always run on "
                                    "the CPU.")
    batch_buckets: str = Field(
        default="auto", description="Batch sizes the runner's model sees (comma-separated, e.g. 8,16,32,64): a batch "
                                    "is padded to the next one and the padding dropped, a larger one split, so "
                                    "cuDNN plans and CUDA graphs are reused; auto: 8,16,32,64 on a GPU, none on the "
                                    "CPU; off: none.")
    hw_codecs: Literal["auto", "off"] = Field(
        default="auto", description="auto: NVDEC/NVENC when ffmpeg has them and a GPU takes a trial frame; off: never.")
    # Speech activity of the new audio (silence=keep): lipsync_runner/audio/speech.py
    vad_aggressiveness: int = Field(default=2, ge=0, le=3, description="WebRTC VAD mode: 0 lenient .. 3 strict.")
    silence_floor_db: float = Field(default=-45.0, le=0, description="Quieter 10 ms frames (dBFS) are silence.")
    min_silence_ms: int = Field(default=200, ge=0, le=5000, description="Shorter pauses count as speech.")
    min_speech_ms: int = Field(default=60, ge=0, le=5000, description="Shorter bursts count as silence.")
    speech_pad_ms: int = Field(default=60, ge=0, le=2000, description="Speech widened by this on both sides.")
    fade_frames: int = Field(default=3, ge=0, le=50,
                             description="Cross-fade frames at each edge of a kept silence or a segment.")
    detect_every: int = Field(
        default=2, ge=1, le=12,
        description="Run the face detector on every k-th frame; the boxes between are interpolated, then smoothed. "
                    "3 cuts the cold path's detector CPU by a third and changes the face track (docs/benchmarks.md).")
    max_spool_gb: float = Field(default=20.0, ge=0,
                                description="A cold job keeps its decoded frames on scratch disk up to this size "
                                            "(one decode); larger videos are decoded twice instead.")
    # Progressive output (media/hls.py): a running job's video as a growing HLS playlist
    progressive: bool = Field(default=True, description="Publish each job's video as it renders: an HLS playlist of "
                                                         "fMP4 segments at /jobs/{id}/live.m3u8 (the same encode as the MP4).")
    progressive_segment_s: float = Field(default=2.0, ge=0.5, le=10.0,
                                         description="Length of a progressive segment; keyframes are forced at each cut.")
    opencv_threads: int = Field(default=1, ge=0, le=256,
                                description="OpenCV threads in the process that runs the pipeline (0: one per core). "
                                            "Its resizes are small and its stages already run in parallel threads "
                                            "beside ffmpeg, so more threads cost CPU in hand-offs (docs/benchmarks.md).")

    @model_validator(mode="after")
    def _threads_from_cores(self) -> "RunnerSettings":
        if self.x264_threads == 0:  # a setting wins; else the replica's cores (and its job workers) decide
            self.x264_threads = x264_threads_for(available_cores(), ServiceSettings().job_workers)
        self.buckets  # noqa: B018 - a bad LIP_SYNC_BATCH_BUCKETS fails at start, not at the first batch
        return self

    @property
    def buckets(self) -> tuple[int, ...] | None:
        """The batch buckets asked for: None for auto (the runner decides by its device), () for none."""
        text = self.batch_buckets.strip().lower()
        if text == "auto":
            return None
        if text in ("off", "", "none"):
            return ()
        try:
            sizes = sorted({int(t) for t in split_list(text)})
        except ValueError:
            raise ValueError(f"LIP_SYNC_BATCH_BUCKETS={self.batch_buckets!r}: expected auto, off or sizes like "
                             "8,16,32,64") from None
        if sizes[0] < 1:
            raise ValueError(f"LIP_SYNC_BATCH_BUCKETS={self.batch_buckets!r}: sizes must be 1 or more")
        return tuple(sizes)


class ServiceSettings(BaseSettings):
    """The API side: jobs, their store and storage, the GPU runner's batching."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    data_dir: Path = Field(default=Path("data"), description="Job records (SQLite) and job files.")
    job_workers: int = Field(default=0, ge=0, le=64, description="Jobs processed at once (CPU side); 0: derived "
                             "from the replica's cores (cgroup-aware): one per two cores, at least 2.")
    chunks_in_flight: int = Field(default=2, ge=1, le=8, description="Chunks of one job at the runner at once: the "
                                  "crop and upload of the next overlap the GPU work on the previous (1: one after "
                                  "another).")
    retention_hours: float = Field(default=24.0, gt=0, description="Finished jobs are removed after this.")
    sweep_interval_s: float = Field(default=300.0, gt=0, description="How often expired jobs and orphaned files "
                                                                     "are swept.")
    max_attempts: int = Field(default=2, ge=1, description="Starts of a job, counting restarts of the server.")
    max_queued_jobs: int = Field(default=100, ge=1, description="Beyond this, generate answers 429.")
    free_space_floor_mb: int = Field(default=1024, ge=0, description="Refuse new jobs below this free space.")
    debug: bool = Field(default=False, description="Tracebacks and internal messages in error responses "
                                                   "(development only).")
    avatar_cache: bool = Field(default=True, description="Reuse face tracks and latents of videos seen before.")
    avatar_cache_dir: Path | None = Field(default=None, description="Default: <data_dir>/avatars.")
    avatar_cache_gb: float = Field(default=20.0, gt=0, description="Size bound of the avatar cache (LRU).")

    # More than one machine: every API replica shares one job store and one bucket (docs/operations.md).
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
    runner_timeout_s: float = Field(default=600.0, gt=0, description="Longest one call to the GPU runner may "
                                                                     "take.")
    # POST /api/lip-sync/preview: rendered at once, beside the job workers (not in their queue).
    preview_seconds: float = Field(default=1.5, gt=0, le=10, description="Length of the stretch a preview renders.")
    max_concurrent_previews: int = Field(
        default=1, ge=0, le=64, description="Previews rendered at once (each holds a CPU thread and shares the GPU "
                                            "runner with jobs); beyond, preview answers 429 with Retry-After. 0 "
                                            "turns previews off (503).")

    # Fairness between owners (API tokens with LIP_SYNC_SCOPE_JOBS_TO_TOKEN; everyone one owner without):
    # one owner's backlog or avatars must not turn every other owner away (429, 507).
    max_queued_jobs_per_owner: int | None = Field(
        default=None, ge=1, description="Jobs one owner may have queued or uploading (over all replicas); beyond, "
                                        "that owner gets 429, others not. Default: a fifth of "
                                        "LIP_SYNC_MAX_QUEUED_JOBS.")
    max_running_jobs_per_owner: int = Field(
        default=0, ge=0, description="Jobs of one owner running at once over all replicas; 0: no cap. Either way "
                                     "a free worker takes the job of the owner with the fewest running, then the "
                                     "one served least recently.")
    avatar_cache_gb_per_owner: float | None = Field(
        default=None, gt=0, description="What one owner's avatars may keep in the avatar cache; beyond, that "
                                        "owner's new avatar gets 507, others not. Default: a fifth of "
                                        "LIP_SYNC_AVATAR_CACHE_GB.")

    @model_validator(mode="after")
    def _workers_from_cores(self) -> "ServiceSettings":
        if self.job_workers == 0:  # a setting wins; else the replica's cores decide
            self.job_workers = job_workers_for(available_cores())
        return self

    @property
    def queued_jobs_per_owner(self) -> int:
        return self.max_queued_jobs_per_owner or max(1, self.max_queued_jobs // 5)

    @property
    def avatar_cache_bytes_per_owner(self) -> int:
        return int((self.avatar_cache_gb_per_owner or self.avatar_cache_gb / 5) * 2**30)

    @property
    def retention_s(self) -> float:
        return self.retention_hours * 3600


class ApiLimits(BaseSettings):
    """What one request may bring: upload sizes, media limits, upload rates, the public URL prefix."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    max_video_bytes: int = Field(default=500 * MiB, gt=0, description="Largest accepted video upload.")
    max_audio_bytes: int = Field(default=100 * MiB, gt=0, description="Largest accepted audio upload.")
    max_video_seconds: float = Field(default=600.0, gt=0, description="Longest accepted video (413 above).")
    max_audio_seconds: float = Field(default=600.0, gt=0, description="Longest accepted audio (413 above).")
    max_video_pixels: int = Field(default=3840 * 2160, gt=0, description="Largest frame, width x height (413 above).")
    max_fps: float = Field(default=120.0, gt=0, description="Highest accepted video frame rate (413 above).")
    max_job_scratch_gb: float = Field(
        default=200.0, ge=0, description="Most scratch disk one job may need: raw ping-pong frames plus the output "
                                         "(413 above; 0: no cap).")
    wait_timeout_s: float = Field(default=3600.0, gt=0, description="Longest a `wait=true` generate call blocks.")
    max_uploads_per_client: int = Field(default=4, ge=1, description="Uploads one client (token, or address "
                                        "without auth) may have in progress at once (429 beyond).")
    max_concurrent_uploads: int = Field(default=32, ge=1, description="Uploads in progress at once (429 beyond).")
    upload_idle_timeout_s: float = Field(default=30.0, gt=0, description="An upload with no data for this long "
                                         "is cut off (408).")
    upload_min_bytes_per_s: int = Field(default=32 * 1024, ge=0, description="Slowest average upload rate "
                                        "accepted once the grace period has passed (408 below).")
    upload_rate_grace_s: float = Field(default=20.0, ge=0, description="Seconds before the minimum rate applies.")
    body_deadline_s: float = Field(default=30.0, gt=0, description="A request body that is not an upload (JSON or "
                                   "form parameters) must arrive whole within this (408 past it).")
    max_bodies_per_client: int = Field(default=8, ge=1, description="Such bodies one client may be sending at once "
                                       "(429 beyond).")
    max_concurrent_bodies: int = Field(default=128, ge=1, description="Such bodies being received at once in all "
                                       "(429 beyond; readiness fails while every slot is taken).")
    url_prefix: str = Field(
        default="/api/lip-sync", description="Public path the API is mounted at (for status/download URLs)."
    )

    @property
    def max_job_scratch_bytes(self) -> int | None:
        return int(self.max_job_scratch_gb * 10**9) or None

    @property
    def max_request_bytes(self) -> int:
        """Largest acceptable /generate body: both files plus the multipart framing."""
        return self.max_video_bytes + self.max_audio_bytes + MULTIPART_OVERHEAD_BYTES


class AuthSettings(BaseSettings):
    """Bearer-token authentication and tenancy."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    api_tokens: str = Field(default="", description="Comma-separated bearer tokens; empty: auth off.")
    api_tokens_file: Path | None = Field(default=None, description="File with one token per line.")
    scope_jobs_to_token: bool = Field(default=False, description="Jobs are visible only to their creator's token.")
    open_metrics: bool = Field(default=False, description="With auth on, serve /metrics without a token "
                               "(its job counts are aggregates over all tenants).")

    @model_validator(mode="after")
    def _no_silent_off(self) -> "AuthSettings":
        if self.api_tokens.strip() and not split_list(self.api_tokens):
            raise ValueError("LIP_SYNC_API_TOKENS is set but holds no token (only separators): refusing to start "
                             "with auth silently off; unset it to run without auth")
        return self

    @property
    def enabled(self) -> bool:
        return bool(split_list(self.api_tokens)) or self.api_tokens_file is not None


class IntegrationSettings(BaseSettings):
    """Idempotency keys, the usage ledger and the queue ETA."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    idempotency_ttl_hours: float = Field(default=24.0, gt=0, description="How long an Idempotency-Key names its job.")
    usage_retention_days: int = Field(default=400, ge=1, description="Usage rows are kept this long.")
    eta_history_jobs: int = Field(default=20, ge=1, le=1000, description="Recent completed jobs the ETA learns from.")


class FetchSettings(BaseSettings):
    """URL inputs: how long their download may take."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    url_connect_timeout_s: float = Field(default=10.0, gt=0, description="Connect (and DNS) timeout of a URL input.")
    url_read_timeout_s: float = Field(default=30.0, gt=0, description="Longest silence while a URL input downloads.")
    url_max_redirects: int = Field(default=5, ge=0, le=20, description="Redirects followed for a URL input.")
    url_max_fetch_s: float = Field(default=900.0, gt=0, description="Longest a URL input may take to download.")



class WebhookSettings(BaseSettings):
    """Signed webhook deliveries and their retries."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    webhook_secret: SecretStr = Field(default=SecretStr(""), description="HMAC secret(s) that sign deliveries; "
                                      "comma-separated while rotating. Without one, webhook_url is refused.")
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="How long a receiver has to answer.")
    webhook_retry_first_s: float = Field(default=5.0, gt=0, description="Delay before the first retry (doubles).")
    webhook_retry_max_s: float = Field(default=3600.0, gt=0, description="Longest delay between two attempts.")
    webhook_max_age_hours: float = Field(default=24.0, gt=0, description="Deliveries are given up this long after "
                                         "their event.")
    webhook_progress_interval_s: float = Field(default=10.0, ge=0, description="At most one progress event per job "
                                               "per this many seconds.")
    webhook_concurrency: int = Field(default=4, ge=1, le=64, description="Deliveries made at once.")
    webhook_per_host: int = Field(default=2, ge=1, le=64, description="Deliveries made at once to one receiver host "
                                  "(name), so that a slow host cannot take every slot.")

    @property
    def secrets(self) -> tuple[str, ...]:
        return split_list(self.webhook_secret.get_secret_value())


class OutboundSettings(BaseSettings):
    """Where the service's own outbound requests (URL inputs, webhooks) may go."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    url_allowlist: str = Field(default="", description="Hosts (comma-separated; *.example.com for subdomains) that "
                               "URL inputs and webhooks may reach even on loopback or private addresses.")


class LogSettings(BaseSettings):
    """The service's log lines."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line.")


class MediaSettings(BaseSettings):
    """The ffmpeg the service runs."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    ffmpeg: str | None = Field(default=None, description="The ffmpeg binary to run: a path, or a name on PATH. "
                               "Default: the one imageio-ffmpeg ships.")


class CredentialsSettings(BaseSettings):
    """Content credentials: the signed C2PA manifest in each MP4 output (lipsync_runner/media/credentials.py)."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    content_credentials: bool = Field(default=True, description="Sign every MP4 output with a C2PA manifest (the "
                                      "AI alteration, the model, the job, the inputs); false: outputs carry none.")
    signing_cert: Path | None = Field(default=None, description="PEM certificate chain: the signing (end-entity) "
                                      "certificate first, then its intermediates, not the root. Unset (with "
                                      "signing_key): a development pair is made under <data_dir>/signing-dev.")
    signing_key: Path | None = Field(default=None, description="PEM private key of the signing certificate.")
    signing_alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        default="es256", description="The signature algorithm; it must fit the key.")


class LiveSettings(BaseSettings):
    """Real-time sessions (`WS /api/lip-sync/live`): speech streamed in, a talking avatar streamed out."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_LIVE_", extra="ignore")

    sessions_per_client: int = Field(default=2, ge=1, description="Live sessions one client (token, or address "
                                     "without auth) may hold at once (close code 4429 beyond).")
    max_sessions: int = Field(default=16, ge=1, description="Live sessions the replica holds at once, all clients "
                              "together (close code 4429 beyond).")
    idle_timeout_s: float = Field(default=30.0, gt=0, description="A session whose client sends nothing for this "
                                  "long is closed (close code 4408).")
    max_session_s: float = Field(default=3600.0, gt=0, description="Longest a session lasts: then its input ends "
                                 "as if the client had sent {\"type\": \"end\"}.")
    batch_frames: int = Field(default=5, ge=1, le=64, description="Frames generated per runner call: fewer, lower "
                              "latency; more, fewer calls.")
    jitter_ms: int = Field(default=200, ge=0, le=5000, description="Audio waited for before a frame without it "
                           "becomes an idle frame (the avatar's own mouth).")
    send_buffer_bytes: int = Field(default=2 * 2**20, ge=16 * 1024, description="Media queued for a client that "
                                   "reads slowly; above it, frames are dropped (reported), so memory stays bounded.")
    max_buffered_audio_s: float = Field(default=30.0, gt=0, description="Speech received ahead of the video at most; "
                                        "beyond it the server stops reading the socket until the video catches up.")


class BentoSettings(BaseSettings):
    """How `service.py` finds the weights: a models directory (``MUSETALK_MODELS_DIR``) wins over the store."""

    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    bento_model: str = Field(default="musetalk:latest", description="The BentoML model store tag of the weights, "
                             "used when MUSETALK_MODELS_DIR is unset (a built Bento packs it).")


class Settings(BaseModel):
    """The whole tree: one instance per process, built at start and handed down."""

    runner: RunnerSettings = Field(default_factory=RunnerSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    limits: ApiLimits = Field(default_factory=ApiLimits)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    integration: IntegrationSettings = Field(default_factory=IntegrationSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    outbound: OutboundSettings = Field(default_factory=OutboundSettings)
    logs: LogSettings = Field(default_factory=LogSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    bento: BentoSettings = Field(default_factory=BentoSettings)
    credentials: CredentialsSettings = Field(default_factory=CredentialsSettings)
    live: LiveSettings = Field(default_factory=LiveSettings)

    @property
    def models_from_store(self) -> bool:
        # the timed runner loads no weights: nothing to take from the store
        return self.runner.models_dir is None and self.runner.runner_model != "timed"


def env_names(section: type[BaseSettings], field: str) -> tuple[str, ...]:
    """The environment variables a field is read from (its aliases, else the prefixed name)."""
    info = section.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(a) for a in alias.choices)
    if isinstance(alias, str):
        return (alias,)
    return (f"{section.model_config.get('env_prefix', '')}{field}".upper(),)


def _default(info) -> str:
    if info.default_factory is not None:
        return "(computed)"
    value = info.default
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if value is None or value == "":
        return "(unset)"
    return f"`{value}`"


def settings_markdown() -> str:
    """docs/configuration.md: every environment variable, by section, with its default and meaning."""
    lines = ["# Configuration", "",
             "Generated from `lipsync_runner/config.py` by `python -m lipsync_runner.config > docs/configuration.md`;",
             "`tests/test_config.py` fails when this page and the code differ. Every variable is read there and",
             "nowhere else. The client SDK and the `lipsync` CLI read `LIPSYNC_SERVER` and `LIPSYNC_TOKEN`.", ""]
    for name, info in Settings.model_fields.items():
        section = info.annotation
        lines += [f"## {name}", "", (section.__doc__ or "").strip().splitlines()[0] if section.__doc__ else "", "",
                  "| variable | default | meaning |", "| --- | --- | --- |"]
        for field, finfo in section.model_fields.items():
            names = " or ".join(f"`{n}`" for n in env_names(section, field))
            desc = (finfo.description or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {names} | {_default(finfo)} | {desc} |")
        lines.append("")
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1])) + "\n"


if __name__ == "__main__":
    sys.stdout.write(settings_markdown())
