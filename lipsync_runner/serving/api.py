"""The CPU side of the service: jobs, their pipeline runs, health, for both API surfaces.

`ApiCore` is what the BentoML `LipSync` service owns. The REST routes (`api/rest.py`) and
the BentoML endpoints (service.py) both go through it, so they behave the same.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import (
    InsufficientStorageError,
    JobCancelledError,
    JobNotFoundError,
    LipSyncError,
    ModelsNotReadyError,
    NoFaceError,
)
from ..avatar_cache import AvatarCache
from ..faces import FaceDetector, load_face_detector
from ..jobs import JobContext, JobFiles, JobKind, JobManager, JobOutcome, open_store
from ..jobs.manager import default_replica_id
from ..api.auth import AuthSettings
from ..api.integration import Integration
from ..api.limits import ApiLimits
from ..api.operations import JobOperations
from ..api.thumbnails import THUMBNAIL_NAME, THUMBNAIL_WIDTH, write_thumbnail
from ..api import avatars as avatar_records
from ..api.admission import media_summary
from ..api.validation import media_limits, validate_media, validate_video
from ..inputs.reference import write_json
from ..inputs.sources import PreparedInputs, prepare_inputs
from ..media import PROBE_TIMEOUT_S
from ..pipeline import PipelineOptions, prepare_avatar, run
from ..scratch import Reservation, ScratchLedger, estimate
from ..settings import RunnerSettings, configure_opencv
from . import metrics
from .packing import job_tag
from .remote import RemoteModel, is_transport_error, runner_submitter
from .settings import ServiceSettings

log = logging.getLogger(__name__)

MODEL_WAIT_S = 900  # a job recovered after a restart waits this long for the models to load
AVATAR_MANIFEST = "avatar.json"  # what an avatar's preparation found (its record's output file)
SCRATCH_WAIT_S = 600  # a job whose scratch does not fit waits this long for running jobs to release theirs


class ApiCore:
    def __init__(self, runner: Any, settings: ServiceSettings | None = None,
                 runner_settings: RunnerSettings | None = None, limits: ApiLimits | None = None,
                 integration: Integration | None = None) -> None:
        self.runner = runner
        self.settings = settings or ServiceSettings()
        self.runner_settings = runner_settings or RunnerSettings()
        configure_opencv(self.runner_settings)  # this process runs the pipeline around the runner
        self.limits = limits or ApiLimits()
        data_dir = Path(self.settings.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.files = JobFiles(data_dir)  # uploads in progress and the workers' scratch (always local)
        s = self.settings
        self.store = open_store(s.database_url.get_secret_value() if s.database_url else None, data_dir,
                                pool_size=s.job_workers + 8)
        from ..storage import open_storage

        self.storage = open_storage(s.storage_url, self.files, endpoint_url=s.s3_endpoint_url,
                                    presigned_downloads=s.presigned_downloads, presign_expiry_s=s.presigned_expiry_s)
        self.avatars = (AvatarCache(s.avatar_cache_dir or data_dir / "avatars",
                                    max_bytes=int(s.avatar_cache_gb * 2**30))
                        if s.avatar_cache else None)
        # webhooks, Idempotency-Key, URL inputs' policy, queue ETA, usage: their own tables, in the
        # job database when it is shared (SQLite in the data directory otherwise)
        replica_id = default_replica_id()
        self.integration = integration or Integration(data_dir, workers=s.job_workers,
                                                      **self._integration_stores(replica_id))
        self.manager = JobManager(
            self.store, self.files, self._execute, storage=self.storage, workers=s.job_workers,
            retention_s=s.retention_s, max_attempts=s.max_attempts, sweep_interval_s=s.sweep_interval_s,
            max_queued=s.max_queued_jobs, free_space_floor_bytes=s.free_space_floor_mb * 2**20, debug=s.debug,
            lease_s=s.lease_s, poll_s=s.queue_poll_s, replica_id=replica_id,
            on_removed=self.avatars.release_job if self.avatars is not None else None,
            on_event=self.integration.on_job_event)
        self._stop = threading.Event()
        # Disk held for running jobs' scratch (frame store, output): admission and job start check it.
        # Always the local data directory: with a bucket too, jobs run in local scratch.
        self.scratch = ScratchLedger(data_dir, floor_bytes=s.free_space_floor_mb * 2**20)
        avatar_room = None if self.avatars is None else self.avatars.check_room_for_avatar
        self.operations = JobOperations(lambda: self.manager, self.limits, ensure_ready=self.ensure_ready,
                                        integration=self.integration, scratch=self.scratch,
                                        avatars_enabled=self.avatars is not None, avatar_room=avatar_room)
        self.integration.bind(self.manager.get, self.manager.store.list, self.operations.status_body)
        self.auth_enabled = AuthSettings().enabled
        self.loop: asyncio.AbstractEventLoop | None = None
        self._detector: FaceDetector | None = None
        self._detector_lock = threading.Lock()
        self._started = time.time()

    def _integration_stores(self, replica_id: str) -> dict[str, Any]:
        """The PostgreSQL outbox, key store and ledger on the job store's pool, when it is PostgreSQL."""
        if not self.store.shared:
            return {}
        from ..jobs.postgres_integration import PostgresIdempotencyStore, PostgresUsageLedger, PostgresWebhookOutbox

        return {"outbox": PostgresWebhookOutbox(self.store),
                "key_store": PostgresIdempotencyStore(self.store, holder=replica_id, lease_s=self.settings.lease_s),
                "ledger": PostgresUsageLedger(self.store)}

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.integration.start()  # before the manager: recovered jobs' events find it ready
        self.manager.start()
        if self.avatars is not None:  # every replica's own cache: expired here, not by the shared sweeper
            threading.Thread(target=self._expire_avatars, name="avatar-expiry", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.manager.close()
        self.integration.stop()

    def _expire_avatars(self) -> None:
        while True:
            try:  # avatars' entries go with their records; a pin left by a crash is dropped here
                self.avatars.expire(self.settings.retention_s,
                                    live=lambda avatar_id: self.store.get(avatar_id) is not None)
                if self.store.shared:  # jobs cleaned up through another replica: their entries here go too
                    self.avatars.release_missing(lambda job_id: self.store.get(job_id) is not None)
            except Exception:
                log.exception("avatar cache expiry failed")
            if self._stop.wait(self.settings.sweep_interval_s):
                return

    # ------------------------------------------------------------------ runner access

    def _submit(self):
        return runner_submitter(self.runner, self.loop)

    async def runner_health(self) -> dict[str, Any]:
        if not hasattr(self.runner, "to_async"):
            return self.runner.health()
        # A pooled connection the runner closed just as we reused it is not an outage: ask again.
        for attempt in range(3):
            try:
                return await asyncio.wait_for(self.runner.to_async.health(), timeout=10)
            except Exception as exc:  # noqa: BLE001 - an unreachable runner is a health state, not a crash
                if is_transport_error(exc) and attempt < 2:
                    await asyncio.sleep(0.05 * (attempt + 1))
                    continue
                return {"status": "unavailable", "models_loaded": False, "device": None, "model_version": None,
                        "error": f"model runner unreachable: {type(exc).__name__}"}
        raise AssertionError("unreachable")

    def runner_health_sync(self) -> dict[str, Any]:
        if hasattr(self.runner, "to_async"):
            assert self.loop is not None
            return asyncio.run_coroutine_threadsafe(self.runner_health(), self.loop).result(timeout=30)
        return self.runner.health()

    async def health(self, *, authenticated: bool = True) -> dict[str, Any]:
        """The health body; job counts (all tenants') only for a caller with a token, or with auth off."""
        runner = await self.runner_health()
        body = {
            "status": "ready" if runner.get("models_loaded") else runner.get("status", "unavailable"),
            "models_loaded": bool(runner.get("models_loaded")),
            "device": runner.get("device"),
            "model_version": runner.get("model_version"),
            "error": runner.get("error"),
            "version": __version__,
            "uptime_s": round(time.time() - self._started, 1),
            "auth": self.auth_enabled,
            "ui": "/ui/",
        }
        if authenticated:
            body["jobs"] = await asyncio.to_thread(self.manager.counts)
        return body

    async def ensure_ready(self) -> None:
        """503 (seed: 'Lip sync service not available') unless the models are loaded."""
        runner = await self.runner_health()
        if not runner.get("models_loaded"):
            reason = runner.get("error") or f"models are {runner.get('status', 'unavailable')}"
            raise ModelsNotReadyError(f"Models not loaded: {reason}")

    # ------------------------------------------------------------------ one job

    def _face_detector(self) -> FaceDetector:
        with self._detector_lock:
            if self._detector is None:
                self._detector = load_face_detector(self.runner_settings.face_detector,
                                                    self.runner_settings.models_dir, "cpu")
            return self._detector

    def _wait_for_models(self, ctx: JobContext) -> dict[str, Any]:
        deadline = time.monotonic() + MODEL_WAIT_S
        while True:
            health = self.runner_health_sync()
            if health.get("models_loaded"):
                return health
            if health.get("status") == "error" or time.monotonic() > deadline:
                raise ModelsNotReadyError(f"Models not loaded: {health.get('error') or 'timed out waiting'}")
            if ctx.should_cancel():
                return health
            ctx.progress("waiting for models", 0.0)
            time.sleep(1.0)

    def _guard_disk(self, progress, reservation: Reservation | None = None):
        """A progress callback that also fails the job cleanly when the disk fills up under it,
        or when it writes past its scratch reservation and the disk has no more room for it."""
        floor = self.settings.free_space_floor_mb * 2**20
        last_check = 0.0

        def guarded(stage: str, fraction: float) -> None:
            nonlocal last_check
            now = time.monotonic()
            if now - last_check > 2.0:
                last_check = now
                if floor and self.files.free_bytes() < floor:
                    raise InsufficientStorageError(
                        "the server ran out of disk space while processing the job; try again later")
                if reservation is not None:
                    reservation.check()
            progress(stage, fraction)

        return guarded

    def _inputs(self, ctx: JobContext) -> PreparedInputs:
        """The job's inputs, ready: URL inputs are fetched here, by the worker, with the upload
        limits; an avatar's video is read where the avatar stores it. Then every input is probed
        once and checked like an upload (a refusal is the job's failure, with the same message):
        the fetched ones for the first time, the uploads again, so a job queued before a restart
        meets today's limits."""
        probe_s = min(PROBE_TIMEOUT_S, self.runner_settings.ffmpeg_timeout_s)

        def validate(video: Path, audio: Path | None, limits: ApiLimits):
            if audio is None:  # an avatar: a video only
                return validate_video(video, limits, timeout_s=probe_s), None
            return validate_media(video, audio, limits, timeout_s=probe_s)

        inputs = prepare_inputs(ctx.job, ctx.work_dir, self.limits, validate=validate,
                                settings=self.integration.fetch, policy=self.integration.policy,
                                s3_reader=self.integration.s3_reader, avatar_video=self._avatar_video,
                                progress=ctx.progress)
        if "video" in inputs.fetched and write_thumbnail(inputs.video, ctx.work_dir / THUMBNAIL_NAME, THUMBNAIL_WIDTH,
                                                         inputs.video_info.demuxer):
            inputs.written.append(THUMBNAIL_NAME)
        if ctx.should_cancel():
            raise JobCancelledError("cancelled")
        return inputs

    def _avatar_video(self, avatar_id: str, owner: str | None) -> Path:
        """The stored video of a job's avatar; the job fails if the avatar went meanwhile."""
        try:
            avatar = avatar_records.ready_avatar(self.manager, avatar_id, owner)
            return avatar_records.stored_video(self.manager, avatar, owner)
        except JobNotFoundError:
            raise LipSyncError(f"avatar {avatar_id} was deleted (or expired) before the job started") from None

    def _options(self, ctx: JobContext) -> tuple[RemoteModel, PipelineOptions]:
        health = self._wait_for_models(ctx)
        model = RemoteModel(self._submit(), chunk_frames=self.settings.chunk_frames, tag=job_tag(ctx.job.job_id),
                            timeout_s=self.settings.runner_timeout_s, weights_id=health.get("weights_id") or "")
        # one batch size for jobs and avatars: an avatar's latents are the ones a job would compute
        options = PipelineOptions.from_settings(self.runner_settings, ctx.job.params,
                                                version=health.get("model_version") or "v15",
                                                batch_size=self.settings.chunk_frames * 4,
                                                limits=media_limits(self.limits))
        return model, options

    def _execute(self, ctx: JobContext) -> JobOutcome:
        if ctx.job.kind is JobKind.avatar:
            return self._prepare_avatar(ctx)
        job = ctx.job
        inputs = self._inputs(ctx)
        model, options = self._options(ctx)
        output = self.files.output_path(job.job_id)
        start = time.perf_counter()
        # The scratch reservation needs both probes (prepare_inputs made them; run() takes the video's).
        need = estimate(inputs.video_info, inputs.audio_info, job.params, max_spool_bytes=options.max_spool_bytes).total
        with self.scratch.reserve(need, directory=ctx.work_dir, wait_s=SCRATCH_WAIT_S,
                                  should_cancel=ctx.should_cancel) as reservation:
            result = run(model, self._face_detector(), inputs.video, inputs.audio, output, options,
                         progress=self._guard_disk(ctx.progress, reservation), should_cancel=ctx.should_cancel,
                         work_dir=ctx.work_dir, video_info=inputs.video_info,
                         cache=self.avatars.for_job(job.job_id, job.owner) if self.avatars is not None else None)
        metrics.job_finished(time.perf_counter() - start, result.frames)
        self.integration.note_output(job.job_id, result.fps)  # usage: output seconds = frames / fps
        return JobOutcome(output_file=output.name, frames=result.frames,
                          timings={k: round(v, 3) for k, v in result.seconds.items()}, cache_hit=result.cache_hit,
                          media=media_summary(inputs.video_info, inputs.audio_info) if inputs.fetched else None,
                          faces=result.faces, keep=inputs.written)

    def _prepare_avatar(self, ctx: JobContext) -> JobOutcome:
        """An avatar's work: its face track and every face frame's latents, into the avatar cache
        entry it pins (api/avatars.py). Its "output" is a small manifest of what was prepared."""
        avatar = ctx.job
        if self.avatars is None:
            raise LipSyncError(avatar_records.DISABLED)
        inputs = self._inputs(ctx)
        model, options = self._options(ctx)
        try:
            result = prepare_avatar(model, self._face_detector(), inputs.video,
                                    self.avatars.for_job(avatar.job_id, avatar.owner, pin=True), options,
                                    progress=self._guard_disk(ctx.progress), should_cancel=ctx.should_cancel,
                                    work_dir=ctx.work_dir, video_info=inputs.video_info)
        finally:
            if self.store.get(avatar.job_id) is None:  # deleted while being prepared: nothing of it stays
                self.avatars.release_job(avatar.job_id)
        if result.face_frames == 0:
            raise NoFaceError(f"no face found in {avatar.video_filename}")
        manifest = ctx.work_dir / AVATAR_MANIFEST
        write_json(manifest, {"frames": result.frames, "face_frames": result.face_frames,
                              "fps": f"{result.fps.numerator}/{result.fps.denominator}",
                              "encoded": result.encoded})
        return JobOutcome(output_file=manifest.name, frames=result.frames,
                          timings={k: round(v, 3) for k, v in result.seconds.items()}, cache_hit=result.cache_hit,
                          media=media_summary(inputs.video_info, None), faces=result.faces, keep=inputs.written)
