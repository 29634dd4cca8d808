"""Face detectors for concurrent jobs: one per job at a time, never one shared behind a lock.

A detector is not thread-safe (FAN holds a lock around its network; Haar and MediaPipe keep
per-instance state), so one instance per API process behind a lock capped cold tracking at one
detector's speed (about 100 frames/s) whatever the cores. The pool lends each running job its own
detector, builds them lazily (a replica that never runs two jobs at once loads one), and keeps
them for the next jobs (loading FAN takes seconds).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lipsync_runner.faces.detectors.base import FaceDetector
from lipsync_runner.faces.detectors.fan import fan_weights_present

log = logging.getLogger(__name__)


def detector_device(setting: str, kind: str, models_dir: Path | str | None) -> str:
    """Where S3FD+FAN run: the setting when it names a device; ``auto``: the GPU when the FAN weights
    are present (``auto`` and ``fan`` detectors use them) and torch sees CUDA, else the CPU.

    Haar and MediaPipe ignore the device (OpenCV and TFLite on the CPU)."""
    setting = (setting or "auto").lower()
    if setting != "auto":
        return setting
    if kind not in ("auto", "fan") or not fan_weights_present(models_dir):
        return "cpu"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; a slim API image may lack it
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class DetectorPool:
    """``with pool.lease() as detector``: a detector used by this caller alone until the block ends.

    At most ``size`` detectors exist; a caller beyond them waits for one to come back (with
    ``size`` = the replica's job workers, none ever waits)."""

    def __init__(self, make: Callable[[], FaceDetector], size: int) -> None:
        if size < 1:
            raise ValueError(f"a detector pool needs a size of 1 or more, got {size}")
        self._make = make
        self.size = size
        self._idle: list[FaceDetector] = []
        self.created = 0
        self._cond = threading.Condition()

    @contextmanager
    def lease(self) -> Iterator[FaceDetector]:
        detector = self._acquire()
        try:
            yield detector
        finally:
            with self._cond:
                self._idle.append(detector)
                self._cond.notify()

    @contextmanager
    def lease_or_spare(self) -> Iterator[FaceDetector]:
        """An idle detector of the pool, else a spare built for this caller and dropped after: for short
        uses (a live session opening its avatar) that must not wait for a job to end."""
        with self._cond:
            spare = not self._idle and self.created >= self.size
        if not spare:
            with self.lease() as detector:
                yield detector
            return
        log.info("face detector pool busy (%d leased): a spare for a short use", self.created)
        yield self._make()

    def _acquire(self) -> FaceDetector:
        with self._cond:
            while not self._idle and self.created >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self.created += 1  # reserved before building: another caller must not build past size
        try:
            detector = self._make()  # outside the lock: loading FAN takes seconds
        except BaseException:
            with self._cond:
                self.created -= 1
                self._cond.notify()
            raise
        log.info("face detector %d of at most %d loaded (%s)", self.created, self.size, detector.name)
        return detector
