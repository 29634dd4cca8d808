"""Live sessions' sources: a caller's prepared avatar, opened against the GPU runner.

The WebSocket endpoint (api/live.py) asks :class:`LiveSources` for a session's avatar; this
resolves it as a generate by ``avatar_id`` does (the caller's own, ready: jobs/avatars.py), opens
the avatar-cache entry its preparation filled (the same options, model and detector, so the same
key) and gives the session a :class:`RemoteModel` on the one runner link: its generate calls go
through the runner's adaptive batcher with every job's and every other session's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from lipsync_runner.config import LiveSettings, Settings
from lipsync_runner.errors import LipSyncError
from lipsync_runner.jobs import avatars as avatar_records
from lipsync_runner.jobs.front import Manager
from lipsync_runner.media.ffmpeg import PROBE_TIMEOUT_S, probe_video
from lipsync_runner.models.musetalk import LipSyncModel
from lipsync_runner.pipeline.live import LiveSource, open_live_source
from lipsync_runner.serving.executor import JobExecutor


class LiveSources:
    def __init__(self, settings: Settings, *, executor: JobExecutor, manager: Manager, scratch_dir: Path) -> None:
        self.all_settings = settings
        self.settings: LiveSettings = settings.live
        # the jobs' runner link, avatar cache, detector pool and disk ledger, through their executor
        self.executor, self.manager, self.scratch_dir = executor, manager, scratch_dir

    @contextmanager
    def open(self, avatar_id: str, owner: str | None, session_id: str) -> Iterator[tuple[LiveSource, LipSyncModel]]:
        """From a worker thread: the session's source and model (AvatarNotFoundError, AvatarNotReadyError,
        ModelsNotReadyError as a generate by avatar_id would raise them)."""
        executor = self.executor
        if executor.avatars is None:
            raise LipSyncError(avatar_records.DISABLED)
        record = avatar_records.ready_avatar(self.manager, avatar_id, owner)
        video = avatar_records.stored_video(self.manager, record, owner)
        # the options the avatar was prepared with (serving/executor.py): its cache key is this session's
        model, options = executor.model_and_options(record.params, session_id, chunk_frames=self.settings.batch_frames)
        s = self.all_settings
        info = probe_video(video, timeout_s=PROBE_TIMEOUT_S, max_pixels=s.limits.max_video_pixels)
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        # the session's frame store holds the avatar's decoded frames (cycled): reserved on the jobs' disk
        # ledger like a job's scratch, so sessions never fill the disk under running jobs (507 -> 4507)
        frames = max(1, info.packet_count or info.frame_count_estimate)
        need = frames * info.width * info.height * 3
        with tempfile.TemporaryDirectory(prefix="live-", dir=self.scratch_dir) as work, \
                executor.scratch.reserve(need, directory=work), ExitStack() as stack:
            # the jobs' detector pool, lent only while the source opens (the cache key names the detector;
            # a ready avatar's track comes from the cache); a spare when every job holds one, so a session
            # never waits for another tenant's job, nor holds a detector for its length
            with executor.detectors.lease_or_spare() as detector:
                source = stack.enter_context(open_live_source(model, detector, video, info,
                                                              executor.avatars.for_job(avatar_id, owner, pin=True),
                                                              options, Path(work)))
            self.manager.extend_expiry(avatar_id)  # a use, like a generate by avatar_id
            yield source, model
