"""Scratch disk of jobs: what a job will write, and reservations that keep jobs within the disk.

A job writes next to its inputs: the raw frame store (framestore.py; always when the plan
goes back in the video, as ping-pong does with a longer audio: a 10-minute 1080p30 video
needs about 112 GB), a laid-out sound track, and the output video. Without a bound the
first job to fill the disk fails every other running job at the free-space floor.

* :func:`estimate` says how much a job will write, from the two probes and the job's
  parameters, by the pipeline's own rules (``plan.spools_frames`` / ``plan.scratch_bytes``).
* :func:`check_admissible` is the admission check: 413 when the estimate is over the
  per-job cap (``LIP_SYNC_MAX_JOB_SCRATCH_GB``), 507 when the disk cannot hold it now.
* :class:`ScratchLedger` is one process's reservations on one directory's file system:
  ``available = free - what reservations have not written yet - floor``. A job reserves its
  estimate before it starts (``with ledger.reserve(...)``); its reservation follows what the
  job really writes (``Reservation.check``) and is released however the job ends.

The ledger counts only this process's jobs (one API process per data directory, see
``jobs/files.py``); anything else writing to the disk shows up in ``free``.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lipsync_runner.errors import InputTooLargeError, InsufficientStorageError, JobCancelledError
from lipsync_runner.pipeline.framestore import store_bytes
from lipsync_runner.media.ffmpeg import AudioInfo, VideoInfo
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.plan import frames_to_decode, needs_random_access, output_length, scratch_bytes, spools_frames

GB = 10**9

# H.264 at crf 18 (the default) spends about 0.01-0.02 bytes per pixel on a talking head
# (5-8 Mbit/s at 1080p30); 0.05 leaves room for grainy, high-motion input.
OUTPUT_BYTES_PER_PIXEL = 0.05
OUTPUT_AUDIO_BYTES_PER_S = 128_000 // 8  # AAC at 128 kbit/s
OUTPUT_OVERHEAD_BYTES = 4 * 2**20  # container index, encoder lookahead, rounding
# A reservation that has been written past grows in steps of this (or what is missing, if more).
GROWTH_STEP_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ScratchEstimate:
    frame_store_bytes: int  # raw RGB frames kept on disk (0 when the plan needs no store)
    sound_bytes: int  # the output's sound track, when the plan lays it out anew (PCM)
    output_bytes: int  # the output video
    output_frames: int
    stored_frames: int
    random_access: bool  # the store is there because the plan goes back in the video (ping-pong)

    @property
    def total(self) -> int:
        return self.frame_store_bytes + self.sound_bytes + self.output_bytes


def default_max_spool_bytes() -> int:
    """The deployment's spool bound (LIP_SYNC_MAX_SPOOL_GB), as the pipeline reads it."""
    from lipsync_runner.config import RunnerSettings

    return int(RunnerSettings().max_spool_gb * 2**30)


def estimate(video: VideoInfo, audio: AudioInfo, params: JobParams | None = None, *,
             max_spool_bytes: int | None = None) -> ScratchEstimate:
    """What a job on these inputs writes at most, by the pipeline's own rules (plan.py).

    The frame store (frames x width x height x 3) when plan.spools_frames says so on a cold
    job: always when the plan goes back in the video (a longer audio with bounce, loop or
    silence), otherwise while it stays under ``max_spool_bytes``; one frame of slack, as the
    probe's count is rounded. Plus the laid-out sound track (plan.scratch_bytes) and the output.
    """
    params = params or JobParams()
    spool = default_max_spool_bytes() if max_spool_bytes is None else int(max_spool_bytes)
    fps, width, height = video.fps, video.width, video.height
    n_audio = max(1, math.floor(audio.duration * fps))
    # a video of timestamps far apart is read only as far as its output shows it (plan.frames_to_decode)
    n_video = max(1, frames_to_decode(params.sync_mode, n_video=video.frame_count_estimate,
                                      n_held=video.packet_count, n_audio=n_audio))
    stores = spools_frames(params, n_video=n_video, n_audio=n_audio, width=width, height=height,
                           max_spool_bytes=spool, cold=True)
    plan_total = scratch_bytes(params, n_video=n_video, width=width, height=height, fps=fps,
                               audio_seconds=audio.duration, audio_rate=audio.sample_rate,
                               audio_channels=audio.channels, max_spool_bytes=spool, cold=True)
    sound = plan_total - (store_bytes(n_video, width, height) if stores else 0)
    n_out = output_length(params.sync_mode, n_video, n_audio)
    output = math.ceil(n_out * width * height * OUTPUT_BYTES_PER_PIXEL + n_out / fps * OUTPUT_AUDIO_BYTES_PER_S)
    stored = n_video + 1 if stores else 0
    return ScratchEstimate(frame_store_bytes=store_bytes(stored, width, height), sound_bytes=sound,
                           output_bytes=output + OUTPUT_OVERHEAD_BYTES, output_frames=n_out, stored_frames=stored,
                           random_access=needs_random_access(params.sync_mode, n_video, n_audio))


def _gb(n: int | float) -> str:
    """Decimal units, as the LIP_SYNC_MAX_JOB_SCRATCH_GB setting and disk vendors count."""
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 10**6:.0f} MB"


class ScratchCap(Protocol):
    """The per-job cap, as ApiLimits carries it (None or 0: no cap)."""

    @property
    def max_job_scratch_bytes(self) -> int | None: ...


def check_admissible(video_info: VideoInfo, audio_info: AudioInfo, limits: ScratchCap,
                     ledger: ScratchLedger | None = None, *, params: JobParams | None = None,
                     max_spool_bytes: int | None = None) -> int:
    """The admission check, after probing: the job's scratch need in bytes.

    InputTooLargeError (413) when it is over the per-job cap; InsufficientStorageError (507)
    when ``ledger`` cannot hold it now (free space minus outstanding reservations minus the
    floor). Nothing is reserved: the job reserves when it starts.
    """
    need = estimate(video_info, audio_info, params, max_spool_bytes=max_spool_bytes)
    cap = limits.max_job_scratch_bytes
    if cap and need.total > cap:
        if need.frame_store_bytes:
            why = " for the ping-pong loop" if need.random_access else ""
            detail = f"{need.stored_frames:,} raw {video_info.width}x{video_info.height} frames kept on disk{why} " \
                     "plus the output"
        else:
            detail = "the output video"
        raise InputTooLargeError(
            f"this job would need about {_gb(need.total)} of scratch disk ({detail}), over the per-job limit "
            f"of {_gb(cap)}; use a shorter or smaller video, or audio no longer than the video")
    if ledger is not None:
        ledger.check(need.total)
    return need.total


def directory_bytes(directory: Path) -> int:
    """Disk blocks used by the files directly in ``directory`` (a job's directory is flat)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
                except FileNotFoundError:  # a temp file removed while we look
                    continue
    except FileNotFoundError:
        return 0
    return total


class Reservation:
    """Bytes held for one job. With a ``directory``, what the job has written there since the
    reservation was made counts as used, so it is not subtracted from free space twice."""

    def __init__(self, ledger: ScratchLedger, nbytes: int, directory: Path | None) -> None:
        self.ledger = ledger
        self.nbytes = int(nbytes)
        self.directory = directory
        self._baseline = directory_bytes(directory) if directory is not None else 0
        self.released = False

    def used(self) -> int:
        if self.directory is None:
            return 0
        return max(0, directory_bytes(self.directory) - self._baseline)

    def unused(self) -> int:
        return max(0, self.nbytes - self.used())

    def check(self) -> None:
        """Call while the job runs: a job that writes past its reservation grows it, or fails
        with 507 when the disk cannot give more (it fails, not the jobs that reserved)."""
        self.ledger._grow(self)

    def release(self) -> None:
        self.ledger._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ScratchLedger:
    """This process's reservations on the file system holding ``directory``; thread-safe."""

    def __init__(self, directory: Path | str, *, floor_bytes: int = 0,
                 disk_usage: Callable[[Path], object] = shutil.disk_usage) -> None:
        self.directory = Path(directory)
        self.floor_bytes = int(floor_bytes)
        self._disk_usage = disk_usage  # replaceable for tests (a small, fake disk)
        self._cond = threading.Condition()
        self._held: list[Reservation] = []

    def free_bytes(self) -> int:
        return int(self._disk_usage(self.directory).free)  # type: ignore[attr-defined]

    @property
    def reserved_bytes(self) -> int:
        """What the held reservations may still write."""
        with self._cond:
            return sum(r.unused() for r in self._held)

    def _available(self) -> int:  # with the lock held
        return self.free_bytes() - sum(r.unused() for r in self._held) - self.floor_bytes

    def available(self) -> int:
        with self._cond:
            return self._available()

    def _refuse(self, nbytes: int, available: int, when: str) -> InsufficientStorageError:
        return InsufficientStorageError(
            f"not enough disk space {when}: the job needs about {_gb(nbytes)} of scratch space and "
            f"{_gb(max(0, available))} is available; try again later")

    def check(self, nbytes: int) -> None:
        """507 unless ``nbytes`` fits now (nothing is reserved)."""
        with self._cond:
            available = self._available()
        if nbytes > available:
            raise self._refuse(nbytes, available, "for this job")

    def reserve(self, nbytes: int, *, directory: Path | str | None = None, wait_s: float = 0.0,
                should_cancel: Callable[[], bool] | None = None) -> Reservation:
        """Hold ``nbytes`` (a context manager that releases it).

        When it does not fit but other reservations are held, wait up to ``wait_s`` for them
        to be released (they end); then, or at once if nothing else is held, 507.
        ``should_cancel`` is polled while waiting (JobCancelledError).
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                available = self._available()
                if nbytes <= available:
                    reservation = Reservation(self, nbytes, Path(directory) if directory is not None else None)
                    self._held.append(reservation)
                    return reservation
                left = deadline - time.monotonic()
                if not self._held or left <= 0:
                    raise self._refuse(nbytes, available, "to start the job")
                if should_cancel is not None and should_cancel():
                    raise JobCancelledError("the job was cancelled")
                self._cond.wait(min(1.0, left))

    def _grow(self, reservation: Reservation) -> None:
        with self._cond:
            if reservation.released:
                return
            used = reservation.used()
            if used < reservation.nbytes:
                return
            missing = used - reservation.nbytes
            available = self._available()  # this reservation has nothing unused: it is not counted
            if missing >= available:
                raise InsufficientStorageError(
                    f"the job has written {_gb(used)}, more than the {_gb(reservation.nbytes)} reserved for it, "
                    f"and the server has no more disk space for it; try again later")
            reservation.nbytes += missing + min(GROWTH_STEP_BYTES, available - missing)

    def _release(self, reservation: Reservation) -> None:
        with self._cond:
            if reservation.released:
                return
            reservation.released = True
            self._held.remove(reservation)
            self._cond.notify_all()
