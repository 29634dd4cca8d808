"""Pass 1 of a job: a stream of frame chunks in, the chosen person's per-frame crop boxes out.

    chunks -> detector (every face) -> crop rule + mouth measure -> identity tracks (identity.py)
           -> choice of person, gap filling, smoothing (choice.py) -> FaceTrack

Frames are not kept: only boxes, landmarks and one mouth number per face and frame.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from lipsync_runner.errors import NoFaceError
from lipsync_runner.faces.boxes import musetalk_crop_box
from lipsync_runner.faces.choice import FaceChoice, FaceTrack, choose_track
from lipsync_runner.faces.detectors.base import FaceDetection, FaceDetector, as_batch
from lipsync_runner.faces.identity import FaceTracks, IdentityTracker, TrackerSettings
from lipsync_runner.faces.smoothing import OneEuro
from lipsync_runner.faces.speaker import mouth_measure

__all__ = ["FaceTrack", "find_tracks", "track_faces"]


def find_tracks(
    chunks: Iterable[np.ndarray],
    detector: FaceDetector | None,
    *,
    bbox_shift: int = 0,
    version: str = "v15",
    extra_margin: int = 10,
    detect_every: int = 1,
    settings: TrackerSettings | None = None,
) -> FaceTracks:
    """Every person in a stream of RGB chunks ``[B, H, W, 3]``, as identity tracks.

    * Each detection gets its MuseTalk crop box (:func:`musetalk_crop_box` with ``bbox_shift``,
      ``version``, ``extra_margin``) and a mouth measure (for ``face=speaker``).
    * ``detect_every`` = k > 1 runs the detector on every k-th frame only, and on the last frame;
      FaceTracks.dense fills the frames in between.
    * ``detector=None`` detects nothing (explicit boxes): the frames are only counted.

    Raises NoFaceError for an empty stream.
    """
    detect_every = max(1, int(detect_every))
    tracker = IdentityTracker(settings)
    name = "explicit" if detector is None else str(getattr(detector, "name", type(detector).__name__))
    detected: list[bool] = []
    hw: tuple[int, int] | None = None
    n = 0
    tail: np.ndarray | None = None  # the last frame, while the detector has not seen it

    def observe(index: int, frame: np.ndarray, dets: list[FaceDetection]) -> None:
        crops = [np.array(musetalk_crop_box(d, frame.shape[:2], bbox_shift=bbox_shift, version=version,
                                            extra_margin=extra_margin), np.float64) for d in dets]
        tracker.update(index, dets, crops, [mouth_measure(frame, d, c) for d, c in zip(dets, crops)])

    for chunk in chunks:
        chunk = as_batch(chunk)
        if len(chunk) == 0:
            continue
        hw = (int(chunk.shape[1]), int(chunk.shape[2]))
        # every k-th frame of the stream: a strided view of the chunk, so no frame is copied for the detector
        first = (-n) % detect_every
        sel = list(range(first, len(chunk), detect_every)) if detector is not None else []
        results = detector.detect(chunk[first::detect_every]) if sel else []
        if len(results) != len(sel):
            raise RuntimeError(f"face detector {name} returned {len(results)} results for {len(sel)} frames")
        for i, dets in zip(sel, results):
            observe(n + i, chunk[i], dets)
        ran = set(sel)
        detected.extend(i in ran for i in range(len(chunk)))
        n += len(chunk)
        tail = chunk[-1].copy() if detector is not None and not detected[-1] else None
    if n == 0 or hw is None:
        raise NoFaceError("no face was detected in any frame of the video (it has no frames)")
    if tail is not None:  # the track must not end on a guess
        observe(n - 1, tail, detector.detect(tail[None])[0])
        detected[-1] = True
    return tracker.finish(n, hw, np.array(detected, bool), name)


def track_faces(
    chunks: Iterable[np.ndarray],
    detector: FaceDetector | None,
    *,
    choice: FaceChoice | None = None,
    audio_envelope: np.ndarray | None = None,
    fps: float | None = None,
    bbox_shift: int = 0,
    version: str = "v15",
    extra_margin: int = 10,
    smoothing: OneEuro | None = OneEuro(),
    detect_every: int = 1,
    fill_gaps: int = 2,
    settings: TrackerSettings | None = None,
) -> FaceTrack:
    """The chosen person's crop box on every frame of a stream of RGB chunks ``[B, H, W, 3]``.

    :func:`find_tracks` then :func:`choose_track` (``choice``: default ``face=largest``;
    ``audio_envelope`` for ``face=speaker``; ``fps``, ``fill_gaps`` and ``smoothing`` as there).
    With explicit boxes the detector does not run. The result's ``summary`` lists everyone found.

    Raises NoFaceError when no frame has a face.
    """
    choice = choice or FaceChoice()
    tracks = find_tracks(chunks, detector if choice.needs_detection else None, bbox_shift=bbox_shift,
                         version=version, extra_margin=extra_margin, detect_every=detect_every, settings=settings)
    return choose_track(tracks, choice, tracks.frame_hw, audio_envelope, fps, fill_gaps=fill_gaps,
                        smoothing=smoothing)
