"""Temporal face tracking: per-frame crop boxes of a video, gap filling and smoothing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import NoFaceError
from .boxes import musetalk_crop_box
from .detection import NUM_LANDMARKS, FaceDetector, _as_batch

_NO_BOX = np.full(4, -1, dtype=np.int32)


# --------------------------------------------------------------------------- tracking


@dataclass
class FaceTrack:
    """Per-frame crop boxes of a whole video (no frames kept)."""

    boxes: np.ndarray  # (N, 4) int32 crop boxes x1, y1, x2, y2; rows of -1 where no face
    landmarks: np.ndarray | None  # (N, 68, 2) float32 frame pixels, NaN rows where no face; None (Haar)
    has_face: np.ndarray  # (N,) bool
    detector: str

    def __len__(self) -> int:
        return len(self.has_face)

    def landmarks_or_none(self, start: int, stop: int) -> np.ndarray | None:
        """Landmarks for frames [start, stop) or None when the track has none."""
        return None if self.landmarks is None else self.landmarks[start:stop]


def _largest(found):
    """The largest face of one frame under either detector protocol (a list, largest first; or one/None)."""
    if isinstance(found, list):
        return found[0] if found else None
    return found


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True values."""
    m = np.concatenate([[False], mask.astype(bool), [False]])
    d = np.diff(m.astype(np.int8))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def _smooth_runs(values: np.ndarray, has: np.ndarray, window: int) -> np.ndarray:
    """Centered moving mean over ``window`` frames, computed separately in each run of ``has``.

    Near a run's ends the window is truncated to the frames of that run, so a value never mixes
    with frames across a no-face gap. NaN entries are skipped. ``values`` is (N, ...) float; rows
    outside runs are kept.
    """
    out = values.copy()
    r = max(0, int(window) // 2)
    if r == 0:
        return out
    for a, b in _runs(has):
        seg = values[a:b].reshape(b - a, -1).astype(np.float64)
        valid = np.isfinite(seg)
        zeros = np.zeros((1, seg.shape[1]))
        c = np.concatenate([zeros, np.cumsum(np.where(valid, seg, 0.0), axis=0)])
        cn = np.concatenate([zeros, np.cumsum(valid, axis=0)])
        idx = np.arange(b - a)
        lo = np.maximum(idx - r, 0)
        hi = np.minimum(idx + r + 1, b - a)
        count = cn[hi] - cn[lo]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, (c[hi] - c[lo]) / np.maximum(count, 1), np.nan)
        out[a:b] = mean.reshape(values[a:b].shape)
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _interpolate(values: np.ndarray, i0: int, i1: int) -> None:
    """Linear interpolation of rows strictly between i0 and i1 (in place)."""
    for k in range(i0 + 1, i1):
        t = (k - i0) / (i1 - i0)
        values[k] = (1 - t) * values[i0] + t * values[i1]


def track_faces(
    chunks: Iterable[np.ndarray],
    detector: FaceDetector,
    *,
    bbox_shift: int = 0,
    version: str = "v15",
    extra_margin: int = 10,
    smoothing: int = 5,
    detect_every: int = 1,
    fill_gaps: int = 2,
) -> FaceTrack:
    """Detect the face in a stream of RGB chunks ``[B, H, W, 3]`` and return per-frame crop boxes.

    Frames are not kept: only their boxes and landmarks.

    * Each detection goes through :func:`musetalk_crop_box` (``bbox_shift``, ``version``,
      ``extra_margin``).
    * ``detect_every`` = k > 1 runs the detector on every k-th frame only (and on the last frame);
      frames in between get their box (and landmarks) linearly interpolated when both surrounding
      detected frames have a face, else they follow the nearest detected frame (face or no face).
    * Short misses: a run of at most ``fill_gaps`` frames without a face between two face frames
      whose crop boxes overlap (IoU >= 0.3) is filled by linear interpolation and counted as face
      frames; a detector miss of one or two frames is far more likely than a face vanishing that
      briefly, and passing those frames through would flicker. ``fill_gaps=0`` disables this.
    * Smoothing: crop boxes (and landmarks) are averaged over a centered window of ``smoothing``
      frames, within each contiguous run of face frames only (the window is truncated at a run's
      ends, never reaching across a no-face gap). ``smoothing <= 1`` disables it.

    Raises NoFaceError when no frame has a face.
    """
    detect_every = max(1, int(detect_every))
    boxes: list[np.ndarray] = []
    lms: list[np.ndarray | None] = []
    has: list[bool] = []
    detected: list[bool] = []  # whether the detector ran on the frame
    any_landmarks = False
    name = getattr(detector, "name", type(detector).__name__)
    n = 0
    last_frame_pending = False
    for chunk in chunks:
        chunk = _as_batch(chunk)
        hw = chunk.shape[1:3]
        b = len(chunk)
        if b == 0:
            continue
        sel = [i for i in range(b) if (n + i) % detect_every == 0]
        dets = [_largest(d) for d in detector.detect(chunk[sel])] if sel else []
        det_by_index = dict(zip(sel, dets))
        for i in range(b):
            ran = i in det_by_index
            d = det_by_index.get(i)
            if d is None:
                boxes.append(_NO_BOX.astype(np.float64))
                lms.append(None)
                has.append(False)
            else:
                boxes.append(np.array(musetalk_crop_box(
                    d, hw, bbox_shift=bbox_shift, version=version, extra_margin=extra_margin), dtype=np.float64))
                lm = None if d.landmarks is None else np.asarray(d.landmarks, np.float64).reshape(NUM_LANDMARKS, 2)
                any_landmarks |= lm is not None
                lms.append(lm)
                has.append(True)
            detected.append(ran)
        n += b
        # the detector must also see the very last frame of the stream, so keep the last chunk's
        # last frame handy only when it was not detected
        last_frame_pending = not detected[-1]
        last_chunk_tail = chunk[-1:].copy() if last_frame_pending else None
    if last_frame_pending:
        d = _largest(detector.detect(last_chunk_tail)[0])
        hw = last_chunk_tail.shape[1:3]
        if d is not None:
            boxes[-1] = np.array(musetalk_crop_box(
                d, hw, bbox_shift=bbox_shift, version=version, extra_margin=extra_margin), dtype=np.float64)
            lms[-1] = None if d.landmarks is None else np.asarray(d.landmarks, np.float64).reshape(NUM_LANDMARKS, 2)
            any_landmarks |= lms[-1] is not None
            has[-1] = True
        detected[-1] = True

    if n == 0 or not any(has):
        raise NoFaceError("no face was detected in any frame of the video")

    box_arr = np.stack(boxes)
    has_arr = np.array(has, dtype=bool)
    lm_arr = None
    if any_landmarks:
        lm_arr = np.full((n, NUM_LANDMARKS, 2), np.nan, dtype=np.float64)
        for i, lm in enumerate(lms):
            if lm is not None:
                lm_arr[i] = lm
        # a face frame without landmarks (mixed detectors) counts as a landmark-less face: keep NaN

    # 1) frames the detector skipped: interpolate between detected frames
    det_idx = np.flatnonzero(np.array(detected))
    for i0, i1 in zip(det_idx[:-1], det_idx[1:]):
        if i1 - i0 <= 1:
            continue
        if has_arr[i0] and has_arr[i1]:
            _interpolate(box_arr, i0, i1)
            if lm_arr is not None:
                _interpolate(lm_arr, i0, i1)
            has_arr[i0 + 1 : i1] = True
        else:
            for k in range(i0 + 1, i1):
                src = i0 if k - i0 <= i1 - k else i1
                box_arr[k] = box_arr[src]
                has_arr[k] = has_arr[src]
                if lm_arr is not None:
                    lm_arr[k] = lm_arr[src]

    # 2) fill short misses between two overlapping face boxes
    if fill_gaps > 0:
        for a, b in _runs(~has_arr):
            if a == 0 or b == n or b - a > fill_gaps:
                continue
            if _iou(box_arr[a - 1], box_arr[b]) < 0.3:
                continue
            _interpolate(box_arr, a - 1, b)
            if lm_arr is not None:
                _interpolate(lm_arr, a - 1, b)
            has_arr[a:b] = True

    # 3) temporal smoothing within runs of face frames
    if smoothing > 1:
        box_arr = _smooth_runs(box_arr, has_arr, smoothing)
        if lm_arr is not None:
            lm_arr = _smooth_runs(lm_arr, has_arr, smoothing)

    out_boxes = np.rint(box_arr).astype(np.int32)
    out_boxes[~has_arr] = -1
    if lm_arr is not None:
        lm_arr = lm_arr.astype(np.float32)
        lm_arr[~has_arr] = np.nan
    return FaceTrack(boxes=out_boxes, landmarks=lm_arr, has_face=has_arr, detector=str(name))
