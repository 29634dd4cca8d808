"""The executor: a claimed job becomes a pipeline run, or an avatar's preparation.

The job manager's workers call it with a :class:`JobContext`; it fetches and checks the inputs,
waits for the models, reserves scratch disk and runs the pipeline against the GPU runner. It never
imports the HTTP layer (an import-linter contract holds it there): the worker path is
jobs -> serving.executor -> pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lipsync_runner.config import Settings
from lipsync_runner.errors import (
    InsufficientStorageError,
    JobCancelledError,
    JobNotFoundError,
    LipSyncError,
    ModelsNotReadyError,
    NoFaceError,
)
from lipsync_runner.faces import FaceDetector, load_face_detector
from lipsync_runner.faces.detectors.pool import DetectorPool, detector_device
from lipsync_runner.integration import metrics
from lipsync_runner.integration.services import Integration
from lipsync_runner.jobs import avatars as avatar_records
from lipsync_runner.jobs.front import Manager
from lipsync_runner.jobs.manager import JobContext, JobOutcome
from lipsync_runner.jobs.records import JobKind, JobRecord
from lipsync_runner.inputs.reference import write_json
from lipsync_runner.inputs.validation import media_limits, media_summary, validate_media, validate_video
from lipsync_runner.config import ApiLimits
from lipsync_runner import __version__
from lipsync_runner.media.credentials import ContentSigner, Ingredient, Provenance, can_sign
from lipsync_runner.media.ffmpeg import PROBE_TIMEOUT_S
from lipsync_runner.media.hls import HlsOutput
from lipsync_runner.media.thumbnails import THUMBNAIL_NAME, THUMBNAIL_WIDTH, write_thumbnail
from lipsync_runner.pipeline.avatar_cache import AvatarCache
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.job import PipelineOptions, prepare_avatar, run
from lipsync_runner.pipeline.scratch_disk import Reservation, ScratchLedger, estimate
from lipsync_runner.serving.job_inputs import PreparedInputs, prepare_inputs
from lipsync_runner.serving.packing import job_tag
from lipsync_runner.serving.remote import RemoteModel, RunnerLink
from lipsync_runner.storage.job_files import CREDENTIALS_NAME, JobFiles

log = logging.getLogger(__name__)

MODEL_WAIT_S = 900  # a job recovered after a restart waits this long for the models to load
AVATAR_MANIFEST = "avatar.json"  # what an avatar's preparation found (its record's output file)
MODEL_VERSIONS = {"v15": "v1.5", "v1": "v1.0"}  # the runner's names -> MuseTalk's
SCRATCH_WAIT_S = 600  # a job whose scratch does not fit waits this long for running jobs to release theirs


class JobExecutor:
    """``executor(ctx) -> JobOutcome``: one claimed job, run."""

    def __init__(self, settings: Settings, *, runner: RunnerLink, files: JobFiles, scratch: ScratchLedger,
                 integration: Integration, avatars: AvatarCache | None,
                 credentials: ContentSigner | None = None) -> None:
        self.settings = settings
        self.runner = runner
        self.files = files
        self.scratch = scratch
        self.integration = integration
        self.avatars = avatars
        self.credentials = credentials  # signs each MP4 output (content credentials); None: off
        # one detector per running job (built when first needed), not one per process behind a lock
        # ... plus one per preview slot (previews render beside the workers, bounded): neither waits on the other
        self.detectors = DetectorPool(self._load_detector,
                                      size=settings.service.job_workers + settings.service.max_concurrent_previews)

    def __call__(self, ctx: JobContext) -> JobOutcome:
        try:
            if ctx.job.kind is JobKind.avatar:
                return self._prepare_avatar(ctx)
            return self._run_job(ctx)
        except LipSyncError as exc:
            _name_what_the_user_sent(exc, ctx.job)
            raise

    # ------------------------------------------------------------------ one job

    def _load_detector(self) -> FaceDetector:
        runner = self.settings.runner
        device = detector_device(runner.face_detector_device, runner.face_detector, runner.models_dir)
        return load_face_detector(runner.face_detector, runner.models_dir, device)

    def _wait_for_models(self, ctx: JobContext) -> dict[str, Any]:
        deadline = time.monotonic() + MODEL_WAIT_S
        while True:
            health = self.runner.health_sync()
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
        floor = self.settings.service.free_space_floor_mb * 2**20
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
        probe_s = min(PROBE_TIMEOUT_S, self.settings.runner.ffmpeg_timeout_s)

        def validate(video: Path, audio: Path | None, limits: ApiLimits):
            if audio is None:  # an avatar: a video only
                return validate_video(video, limits, timeout_s=probe_s), None
            return validate_media(video, audio, limits, params=ctx.job.params, timeout_s=probe_s)

        def avatar_video(avatar_id: str, owner: str | None) -> Path:
            return _avatar_video(ctx.jobs, avatar_id, owner)

        inputs = prepare_inputs(ctx.job, ctx.work_dir, self.settings.limits, validate=validate,
                                settings=self.integration.fetch, policy=self.integration.policy,
                                s3_reader=self.integration.s3_reader, avatar_video=avatar_video,
                                progress=ctx.progress, should_cancel=ctx.should_cancel)
        if "video" in inputs.fetched and write_thumbnail(inputs.video, ctx.work_dir / THUMBNAIL_NAME, THUMBNAIL_WIDTH,
                                                         inputs.video_info.demuxer,
                                                         max_pixels=self.settings.limits.max_video_pixels):
            inputs.written.append(THUMBNAIL_NAME)
        if ctx.should_cancel():
            raise JobCancelledError("cancelled")
        return inputs

    def _options(self, ctx: JobContext) -> tuple[RemoteModel, PipelineOptions]:
        return self.model_and_options(ctx.job.params, ctx.job.job_id, self._wait_for_models(ctx))

    def model_and_options(self, params: JobParams, tag: str, health: dict[str, Any] | None = None, *,
                          chunk_frames: int | None = None) -> tuple[RemoteModel, PipelineOptions]:
        """The runner's model and the pipeline options for a job's parameters (a preview's and a live
        session's too: the same options, so the same avatar-cache key and render); ``health``: the
        runner's, asked now if not given; ``chunk_frames``: frames per runner call (default the jobs')."""
        if health is None:
            health = self.runner.health_sync()
            if not health.get("models_loaded"):
                raise ModelsNotReadyError(f"Models not loaded: {health.get('error') or health.get('status')}")
        service = self.settings.service
        model = RemoteModel(self.runner.submitter(), chunk_frames=chunk_frames or service.chunk_frames,
                            tag=job_tag(tag), timeout_s=service.runner_timeout_s,
                            weights_id=health.get("weights_id") or "")
        # one batch size for jobs and avatars: an avatar's latents are the ones a job would compute
        options = PipelineOptions.from_settings(self.settings.runner, params,
                                                version=health.get("model_version") or "v15",
                                                batch_size=service.chunk_frames * 4,
                                                chunks_in_flight=service.chunks_in_flight,
                                                limits=media_limits(self.settings.limits))
        return model, options

    def _run_job(self, ctx: JobContext) -> JobOutcome:
        job = ctx.job
        inputs = self._inputs(ctx)
        model, options = self._options(ctx)
        if self.settings.runner.progressive and ctx.publish is not None:
            options = replace(options, hls=HlsOutput(ctx.work_dir, self.settings.runner.progressive_segment_s,
                                                     publish=ctx.publish, progress=ctx.note_live))
        output = self.files.output_path(job.job_id, job.params.output_format)
        start = time.perf_counter()
        # The scratch reservation needs both probes (prepare_inputs made them; run() takes the video's).
        need = estimate(inputs.video_info, inputs.audio_info, job.params, max_spool_bytes=options.max_spool_bytes).total
        with self.scratch.reserve(need, directory=ctx.work_dir, wait_s=SCRATCH_WAIT_S,
                                  should_cancel=ctx.should_cancel) as reservation, self.detectors.lease() as detector:
            result = run(model, detector, inputs.video, inputs.audio, output, options,
                         progress=self._guard_disk(ctx.progress, reservation), should_cancel=ctx.should_cancel,
                         work_dir=ctx.work_dir, video_info=inputs.video_info,
                         cache=self.avatars.for_job(job.job_id, job.owner) if self.avatars is not None else None)
        metrics.job_finished(time.perf_counter() - start, result.frames)
        self.integration.note_output(job.job_id, result.fps)  # usage: output seconds = frames / fps
        signed = self._sign(ctx, output, inputs, options.version)
        return JobOutcome(output_file=output.name, frames=result.frames,
                          timings={k: round(v, 3) for k, v in result.seconds.items()}, cache_hit=result.cache_hit,
                          media=media_summary(inputs.video_info, inputs.audio_info) if inputs.fetched else None,
                          faces=result.faces, keep=[*inputs.written, *signed])

    def _sign(self, ctx: JobContext, output: Path, inputs: PreparedInputs, version: str) -> list[str]:
        """Content credentials into the finished output; the manifest read back is kept beside it for
        GET .../credentials. Returns the files to keep (none when off, or for a WebM output)."""
        if self.credentials is None or not can_sign(output):
            return []
        job = ctx.job
        manifest = self.credentials.sign(output, Provenance(
            job_id=job.job_id, model="MuseTalk", model_version=MODEL_VERSIONS.get(version, version),
            software="lipsync-runner", software_version=__version__), [
            Ingredient("video", inputs.video, job.video_filename or inputs.video.name, inputs.video_info.demuxer),
            Ingredient("audio", inputs.audio, job.audio_filename or inputs.audio.name,
                       inputs.audio_info.demuxer if inputs.audio_info is not None else None)])
        write_json(ctx.work_dir / CREDENTIALS_NAME, manifest)
        return [CREDENTIALS_NAME]

    def _prepare_avatar(self, ctx: JobContext) -> JobOutcome:
        """An avatar's work: its face track and every face frame's latents, into the avatar cache
        entry it pins (jobs/avatars.py). Its "output" is a small manifest of what was prepared."""
        avatar = ctx.job
        if self.avatars is None:
            raise LipSyncError(avatar_records.DISABLED)
        inputs = self._inputs(ctx)
        model, options = self._options(ctx)
        try:
            with self.detectors.lease() as detector:
                result = prepare_avatar(model, detector, inputs.video,
                                        self.avatars.for_job(avatar.job_id, avatar.owner, pin=True), options,
                                        progress=self._guard_disk(ctx.progress), should_cancel=ctx.should_cancel,
                                        work_dir=ctx.work_dir, video_info=inputs.video_info)
        finally:
            try:
                ctx.jobs.get(avatar.job_id)
            except JobNotFoundError:  # deleted while being prepared: nothing of it stays
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


def _avatar_video(jobs: Manager, avatar_id: str, owner: str | None) -> Path:
    """The stored video of a job's avatar; the job fails if the avatar went meanwhile."""
    try:
        avatar = avatar_records.ready_avatar(jobs, avatar_id, owner)
        return avatar_records.stored_video(jobs, avatar, owner)
    except JobNotFoundError:
        raise LipSyncError(f"avatar {avatar_id} was deleted (or expired) before the job started") from None


def _name_what_the_user_sent(exc: LipSyncError, job: JobRecord) -> None:
    """A failure names the files as the user sent them (clip.mp4), not as the job stores them
    (input_video.mp4): the stored names mean nothing to the user and tell how the server keeps files."""
    message = exc.message
    for stored, shown in ((job.video_file, job.video_filename), (job.audio_file, job.audio_filename)):
        if stored and shown and stored != shown:
            message = message.replace(stored, shown)
    if message != exc.message:
        exc.message = message
        exc.args = (message,)
