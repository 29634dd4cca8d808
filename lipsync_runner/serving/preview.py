"""Previews, rendered in the API process beside the job workers (api/preview.py has the contract).

A preview runs the job's own pipeline (pipeline.job.preview: the same plan, faces and audio windows
as the full job) for a short stretch, against the same GPU runner, with the executor's face
detector, and through the avatar cache: a cold preview tracks the whole video once and leaves the
track (and the stretch's latents) in the cache entry the full job opens next, under the caller's
owner, so that job does not track again. The entry records no job (it goes with the cache's
retention or size bound, like any unused entry).

Bounded: at most ``max_concurrent_previews`` render at once (a non-blocking semaphore: 429 with
Retry-After beyond, never a wait that would hold the request); the job workers are separate
threads, so queued jobs and previews never wait on each other's slots.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np

from lipsync_runner.api.admission import PreviewRequest
from lipsync_runner.api.preview import JPEG, PreviewAnswer
from lipsync_runner.config import Settings
from lipsync_runner.errors import LipSyncError, QueueFullError
from lipsync_runner.pipeline.avatar_cache import JobAvatarCache
from lipsync_runner.pipeline.job import preview
from lipsync_runner.pipeline.scratch_disk import estimate
from lipsync_runner.media.ffmpeg import PROBE_TIMEOUT_S, probe_audio, probe_video
from lipsync_runner.serving.executor import JobExecutor

STRIP_HEIGHT = 180  # pixels per frame in a JPEG strip
RETRY_AFTER_S = 3  # a preview takes seconds


class PreviewsOffError(LipSyncError):
    http_status = 503
    retry_after_s = 60


class Previewer:
    def __init__(self, settings: Settings, executor: JobExecutor) -> None:
        self.settings = settings
        self.executor = executor
        self.limit = settings.service.max_concurrent_previews
        self._slots = threading.BoundedSemaphore(max(1, self.limit))
        self.root = Path(settings.service.data_dir) / "previews"

    def check_room(self) -> None:
        if self.limit == 0:
            raise PreviewsOffError("previews are turned off on this server (LIP_SYNC_MAX_CONCURRENT_PREVIEWS=0)")
        if self._slots._value <= 0:  # a hint only: slot() decides
            raise QueueFullError(f"{self.limit} preview(s) are being rendered already; try again shortly",
                                 retry_after_s=RETRY_AFTER_S)

    @contextmanager
    def slot(self) -> Iterator[None]:
        self.check_room()
        if not self._slots.acquire(blocking=False):
            raise QueueFullError(f"{self.limit} preview(s) are being rendered already; try again shortly",
                                 retry_after_s=RETRY_AFTER_S)
        try:
            yield
        finally:
            self._slots.release()

    @contextmanager
    def work_dir(self) -> Iterator[Path]:
        self.root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="preview-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def render(self, request: PreviewRequest, owner: str | None, media_type: str) -> PreviewAnswer:
        executor = self.executor
        work = request.audio.parent
        model, options = executor.model_and_options(request.params, tag=f"preview-{uuid.uuid4()}")
        probe_s = min(PROBE_TIMEOUT_S, self.settings.runner.ffmpeg_timeout_s)
        video_info = probe_video(request.video, timeout_s=probe_s, max_pixels=self.settings.limits.max_video_pixels)
        audio_info = probe_audio(request.audio, timeout_s=probe_s)
        need = estimate(video_info, audio_info, request.params, max_spool_bytes=options.max_spool_bytes).total
        cache = JobAvatarCache(executor.avatars, None, owner) if executor.avatars is not None else None  # no job
        output = work / "preview.mp4" if media_type != JPEG else None
        with executor.scratch.reserve(need, directory=work), executor.detectors.lease() as detector:
            result = preview(model, detector, request.video, request.audio, options, at=request.at,
                             seconds=self.settings.service.preview_seconds, output=output, cache=cache,
                             work_dir=work, video_info=video_info)
        body = output.read_bytes() if output is not None else jpeg_strip(result.frames)
        fps = float(result.fps)
        return PreviewAnswer(body=body, media_type=media_type, faces=result.faces, start=result.start / fps,
                             end=result.stop / fps)


def jpeg_strip(frames: np.ndarray, height: int = STRIP_HEIGHT, quality: int = 85) -> bytes:
    """RGB frames [k, H, W, 3] side by side, each scaled to ``height`` (one JPEG)."""
    h, w = frames.shape[1:3]
    width = max(1, round(w * height / h))
    tiles = [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(np.hstack(tiles), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise LipSyncError("could not encode the preview strip")
    return data.tobytes()
