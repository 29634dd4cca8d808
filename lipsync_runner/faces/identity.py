"""Faces with identity: per-frame detections joined into one track per person.

The detector finds every face of a frame but knows nothing of the frame before; two people side
by side come back largest first, and when their sizes are close that order flips from frame to
frame. :class:`IdentityTracker` keeps one track per person instead: each new detection joins the
track whose predicted box (last box moved on at the track's own speed) it fits best, all
detections of a frame at once (an optimal assignment, so two people can never claim the same face
or trade places), and a detection far from every prediction starts a new track. A track that
finds no face stays open for ``max_age`` frames (a turned head, a hand, someone walking past),
coasting along its last speed, so the person keeps their id when they come back.

Detections arrive frame by frame (a stream: frames are never kept); :class:`FaceTracks` is what
is known at the end: per track the detected frames, boxes, MuseTalk crop boxes, landmarks and a
mouth-opening measure (for ``face=speaker``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from lipsync_runner.faces.detectors.base import NUM_LANDMARKS, FaceDetection

_FORBIDDEN = 1e6  # cost of a pair outside the gates
MAX_LISTED = 32  # tracks listed in a summary (a crowd or a long video with many cuts finds hundreds)


@dataclass(frozen=True)
class TrackerSettings:
    """How detections are joined into tracks (distances in face sizes, times in frames)."""

    max_age: int = 25  # frames a track without a face stays open (1 s at 25 fps)
    min_hits: int = 3  # detections a track needs to count (fewer: a false detection)
    gate: float = 0.5  # largest centre distance, in face sizes, one frame after the last sighting
    gate_growth: float = 0.05  # ... growing by this much per frame unseen
    max_gate: float = 1.0  # ... up to this (two faces side by side are further apart than this)
    max_area_ratio: float = 2.5  # a face cannot grow or shrink by more than this between sightings
    max_coast: int = 10  # frames the predicted box keeps moving at the last speed, then stops


@dataclass
class IdentityTrack:
    """One person: what the detector saw of them, on the frames it ran and found them."""

    id: int
    frames: np.ndarray  # (M,) int64 frame indices, increasing
    boxes: np.ndarray  # (M, 4) float64 detector boxes x1, y1, x2, y2
    crops: np.ndarray  # (M, 4) float64 MuseTalk crop boxes of those detections
    landmarks: np.ndarray | None  # (M, 68, 2) float32, NaN rows for a detection without; None: none had any
    mouth: np.ndarray  # (M,) float64 mouth opening measure (see speaker.mouth_measure), NaN unknown
    scores: np.ndarray  # (M,) float64 detector confidence

    @property
    def first_frame(self) -> int:
        return int(self.frames[0])

    @property
    def last_frame(self) -> int:
        return int(self.frames[-1])


@dataclass
class FaceTracks:
    """Every person found in a video, and which frames the detector ran on."""

    tracks: list[IdentityTrack]
    n_frames: int
    frame_hw: tuple[int, int]
    detected: np.ndarray  # (N,) bool: the detector ran on this frame
    detector: str

    def __len__(self) -> int:
        return len(self.tracks)

    def by_id(self, track_id: int) -> IdentityTrack | None:
        return next((t for t in self.tracks if t.id == track_id), None)

    def dense(self, track: IdentityTrack) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Per-frame ``(crops (N, 4) float, landmarks (N, 68, 2) or None, present (N,) bool)``.

        Frames the detector skipped (``detect_every`` > 1) are filled from the detector frames on
        either side: interpolated when the person was found on both, else following the nearer one.
        """
        n = self.n_frames
        crops = np.full((n, 4), np.nan)
        present = np.zeros(n, bool)
        crops[track.frames] = track.crops
        present[track.frames] = True
        lms = None
        if track.landmarks is not None:
            lms = np.full((n, NUM_LANDMARKS, 2), np.nan)
            lms[track.frames] = track.landmarks
        ran = np.flatnonzero(self.detected)
        for i0, i1 in zip(ran[:-1], ran[1:]):
            if i1 - i0 <= 1:
                continue
            if present[i0] and present[i1]:
                t = ((np.arange(i0 + 1, i1) - i0) / (i1 - i0))[:, None]
                crops[i0 + 1 : i1] = (1 - t) * crops[i0] + t * crops[i1]
                if lms is not None:
                    lms[i0 + 1 : i1] = (1 - t[:, :, None]) * lms[i0] + t[:, :, None] * lms[i1]
                present[i0 + 1 : i1] = True
            else:
                for k in range(i0 + 1, i1):
                    src = i0 if k - i0 <= i1 - k else i1
                    present[k] = present[src]
                    crops[k] = crops[src]
                    if lms is not None:
                        lms[k] = lms[src]
        return crops, lms, present

    def summary(self, chosen: list[int] | None = None) -> dict[str, Any]:
        """JSON-able: how many tracks, and per track when and where (for a client to pick one).

        ``box`` is the track's mean crop box (the region that is re-generated), ints; ``chosen``
        the ids of the tracks dubbed ([] when none was, or explicit boxes were given). It goes
        into the job status, so at most MAX_LISTED tracks are listed (in id order): the chosen
        ones, then those seen on most frames; ``count`` is always the number found."""
        frames = {t.id: int(self.dense(t)[2].sum()) for t in self.tracks}
        keep = set(chosen or [])
        keep |= set(sorted(frames, key=lambda i: (-frames[i], i))[: max(0, MAX_LISTED - len(keep))])
        tracks = []
        for t in self.tracks:
            if t.id not in keep:
                continue
            tracks.append({
                "id": t.id,
                "first_frame": t.first_frame,
                "last_frame": t.last_frame,
                "frames": frames[t.id],
                "box": [int(round(v)) for v in t.crops.mean(axis=0)],
            })
        return {"count": len(self.tracks), "frames": self.n_frames, "chosen": list(chosen or []), "tracks": tracks}


@dataclass
class _Live:
    """A track being built."""

    id: int
    frames: list[int] = field(default_factory=list)
    boxes: list[np.ndarray] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list)
    landmarks: list[np.ndarray | None] = field(default_factory=list)
    mouth: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))  # box units per frame

    def predict(self, frame: int, max_coast: int) -> np.ndarray:
        return self.boxes[-1] + self.velocity * min(frame - self.frames[-1], max_coast)

    def add(self, frame: int, det: FaceDetection, crop: np.ndarray, mouth: float) -> None:
        box = np.asarray(det.box, np.float64).reshape(4)
        if self.frames:
            step = (box - self.boxes[-1]) / (frame - self.frames[-1])
            # smoothed so that one noisy box does not throw the prediction off
            self.velocity = step if len(self.frames) == 1 else 0.5 * self.velocity + 0.5 * step
        self.frames.append(frame)
        self.boxes.append(box)
        self.crops.append(np.asarray(crop, np.float64).reshape(4))
        self.landmarks.append(None if det.landmarks is None
                              else np.asarray(det.landmarks, np.float32).reshape(NUM_LANDMARKS, 2))
        self.mouth.append(float(mouth))
        self.scores.append(float(det.score))


def _side(box: np.ndarray) -> float:
    return float(np.sqrt(max(box[2] - box[0], 1e-6) * max(box[3] - box[1], 1e-6)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class IdentityTracker:
    """Joins each frame's detections to open tracks; :meth:`finish` returns the :class:`FaceTracks`."""

    def __init__(self, settings: TrackerSettings | None = None) -> None:
        self.settings = settings or TrackerSettings()
        self._open: list[_Live] = []
        self._closed: list[_Live] = []
        self._next_id = 0

    def cost(self, live: _Live, frame: int, det: FaceDetection) -> float:
        """How badly ``det`` fits ``live`` at ``frame`` (0: exactly where predicted); _FORBIDDEN outside the gates."""
        s = self.settings
        gap = frame - live.frames[-1]
        pred = live.predict(frame, s.max_coast)
        box = np.asarray(det.box, np.float64)
        size = np.sqrt(_side(pred) * _side(box))
        area_ratio = _side(box) ** 2 / _side(pred) ** 2
        if not 1 / s.max_area_ratio <= area_ratio <= s.max_area_ratio:
            return _FORBIDDEN
        last_lm = live.landmarks[-1]
        if det.landmarks is not None and last_lm is not None and np.isfinite(det.landmarks).all():
            # landmarks say more than a box centre: the same face in the same pose lines up point by point
            shift = (pred[:2] + pred[2:]) / 2 - (live.boxes[-1][:2] + live.boxes[-1][2:]) / 2
            dist = float(np.linalg.norm(np.asarray(det.landmarks) - (last_lm + shift), axis=1).mean()) / size
        else:
            dist = float(np.linalg.norm((box[:2] + box[2:]) / 2 - (pred[:2] + pred[2:]) / 2)) / size
        if dist > min(s.max_gate, s.gate + s.gate_growth * (gap - 1)):
            return _FORBIDDEN
        tentative = 0.3 if len(live.frames) < s.min_hits else 0.0  # established tracks come first
        return dist + 0.5 * (1 - iou(pred, box)) + 0.5 * abs(np.log(area_ratio)) + 0.02 * (gap - 1) + tentative

    def update(self, frame: int, detections: list[FaceDetection], crops: list[np.ndarray],
               mouth: list[float] | None = None) -> list[int]:
        """Add one frame's detections (frames in increasing order); returns the track id of each."""
        s = self.settings
        mouth = mouth if mouth is not None else [np.nan] * len(detections)
        still_open = []
        for live in self._open:
            (still_open if frame - live.frames[-1] <= s.max_age else self._closed).append(live)
        self._open = still_open
        ids = [-1] * len(detections)
        if self._open and detections:
            costs = np.array([[self.cost(live, frame, d) for d in detections] for live in self._open])
            rows, cols = linear_sum_assignment(costs)
            for r, c in zip(rows, cols):
                if costs[r, c] < _FORBIDDEN:
                    self._open[r].add(frame, detections[c], crops[c], mouth[c])
                    ids[c] = self._open[r].id
        for c, d in enumerate(detections):
            if ids[c] < 0:
                live = _Live(self._next_id)
                self._next_id += 1
                live.add(frame, d, crops[c], mouth[c])
                self._open.append(live)
                ids[c] = live.id
        return ids

    def finish(self, n_frames: int, frame_hw: tuple[int, int], detected: np.ndarray, detector: str) -> FaceTracks:
        """Tracks with at least ``min_hits`` detections, numbered 0.. in order of first appearance
        (left to right within a frame): the same video and settings always give the same ids."""
        kept = [t for t in self._closed + self._open if len(t.frames) >= self.settings.min_hits]
        kept.sort(key=lambda t: (t.frames[0], t.boxes[0][0]))
        tracks = []
        for new_id, t in enumerate(kept):
            lms = None
            if any(lm is not None for lm in t.landmarks):
                lms = np.stack([np.full((NUM_LANDMARKS, 2), np.nan, np.float32) if lm is None else lm
                                for lm in t.landmarks])
            tracks.append(IdentityTrack(
                id=new_id, frames=np.asarray(t.frames, np.int64), boxes=np.stack(t.boxes), crops=np.stack(t.crops),
                landmarks=lms, mouth=np.asarray(t.mouth, np.float64), scores=np.asarray(t.scores, np.float64)))
        return FaceTracks(tracks=tracks, n_frames=int(n_frames), frame_hw=(int(frame_hw[0]), int(frame_hw[1])),
                          detected=np.asarray(detected, bool), detector=detector)
