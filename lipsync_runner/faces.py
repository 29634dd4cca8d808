"""Face detection, MuseTalk's crop-box rule and temporal tracking.

Frames are RGB uint8 numpy arrays ``[H, W, 3]``; batches are ``[B, H, W, 3]``.

Two detectors share the :class:`FaceDetector` protocol:

* :class:`FanFaceDetector`: S3FD boxes + FAN 68-point landmarks from the ``face_alignment``
  package, with the weight files read from ``<models_dir>/face-alignment/`` (never downloaded).
  The landmarks follow the iBUG 68-point scheme, the one MuseTalk's crop rule is written for.
* :class:`HaarFaceDetector`: OpenCV's Haar cascades shipped in ``cv2.data``; needs no model files
  and gives boxes only. The crop box is then derived from the detector box (see
  :func:`musetalk_crop_box`).

:func:`track_faces` consumes a stream of frame chunks and returns one crop box per frame,
smoothed over time, with frames without a face flagged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from .errors import ModelFilesError, NoFaceError

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 68
#: Sub-folder of the models directory holding the face_alignment weights.
FACE_ALIGNMENT_DIR = "face-alignment"
#: S3FD face detector weights (a plain state dict), face_alignment's file name.
S3FD_FILENAME = "s3fd-619a316812.pth"
#: 2D FAN (4 hourglass modules) landmark weights (a plain state dict), face_alignment's file name.
FAN_FILENAME = "2DFAN4-11f355bf06.pth.tar"

# Where a frontal face's landmarks fall relative to a Haar box, as fractions of the box size
# (measured on frontal faces with OpenCV's frontalface cascades: the box runs from the forehead to
# about the lower lip). Used to synthesise MuseTalk's landmark box when no landmarks are known.
HAAR_SIDE_INSET = 0.04  # jaw contour x extent: box sides moved in by 4 % of the width
HAAR_NOSE_BRIDGE_Y = 0.55  # landmark 29 (nose bridge) at 55 % of the box height
HAAR_CHIN_Y = 1.15  # lowest landmark (chin, 8) at 115 % of the box height, below the box

_NO_BOX = np.full(4, -1, dtype=np.int32)


# --------------------------------------------------------------------------- detections


@dataclass
class FaceDetection:
    """The largest face in one frame."""

    box: np.ndarray  # (4,) float x1, y1, x2, y2 in frame pixels
    landmarks: np.ndarray | None  # (68, 2) float x, y in frame pixels (iBUG 68), or None
    score: float  # detector confidence (S3FD: probability; Haar: see HaarFaceDetector)


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, frames: np.ndarray) -> list[FaceDetection | None]:
        """Largest face per frame of an RGB uint8 batch ``[B, H, W, 3]``; None where none."""
        ...


def _as_batch(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [B,H,W,3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    return frames


def _downscale_factor(hw: tuple[int, int], max_side: int | None) -> float:
    if not max_side:
        return 1.0
    longest = max(hw)
    return min(1.0, max_side / float(longest))


class HaarFaceDetector:
    """Offline default: OpenCV Haar cascades (no model files needed), boxes only.

    Each frame is converted to grayscale, downscaled so its longest side is at most
    ``detect_max_side`` pixels, histogram-equalised and searched with the ``alt2`` frontal cascade,
    then with the ``default`` one if ``alt2`` found nothing. The largest hit is scaled back to frame
    pixels. ``score`` is the cascade's neighbour count for that hit divided by 50, capped at 1
    (a rough confidence, not a probability).
    """

    name = "haar"

    def __init__(
        self,
        *,
        detect_max_side: int = 400,
        scale_factor: float = 1.15,
        min_neighbors: int = 5,
        min_face_fraction: float = 0.12,
    ) -> None:
        # Measured on 640x360 talking-head frames (2 cores): 480 px / 1.1 / 0.06 took 47 ms a
        # frame, these 16 ms, with boxes within 4 px of it (the smoothing absorbs that). The cost
        # is that faces smaller than 12 % of the frame's short side are not found, which a
        # lip-sync source video (a speaker's face) does not have.
        self.detect_max_side = detect_max_side
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_face_fraction = min_face_fraction
        self._cascades = []
        for fname in ("haarcascade_frontalface_alt2.xml", "haarcascade_frontalface_default.xml"):
            path = Path(cv2.data.haarcascades) / fname
            cascade = cv2.CascadeClassifier(str(path))
            if cascade.empty():
                raise ModelFilesError(f"OpenCV's Haar cascade {fname} could not be loaded from {path}")
            self._cascades.append(cascade)
        # CascadeClassifier keeps per-call scratch state: serialise calls from several threads.
        self._lock = threading.Lock()

    def detect(self, frames: np.ndarray) -> list[FaceDetection | None]:
        frames = _as_batch(frames)
        return [self._detect_one(f) for f in frames]

    def _detect_one(self, frame: np.ndarray) -> FaceDetection | None:
        h, w = frame.shape[:2]
        s = _downscale_factor((h, w), self.detect_max_side)
        if s < 1.0:
            small = cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        else:
            small = frame
        gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        gray = cv2.equalizeHist(gray)
        min_side = max(20, int(round(min(gray.shape) * self.min_face_fraction)))
        with self._lock:
            for cascade in self._cascades:
                rects, neighbours = cascade.detectMultiScale2(
                    gray,
                    scaleFactor=self.scale_factor,
                    minNeighbors=self.min_neighbors,
                    minSize=(min_side, min_side),
                )
                if len(rects):
                    break
            else:
                return None
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        i = int(np.argmax(rects[:, 2] * rects[:, 3]))
        x, y, bw, bh = rects[i] / s
        box = np.array([x, y, x + bw, y + bh], dtype=np.float64)
        box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
        box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
        score = min(1.0, float(np.asarray(neighbours).reshape(-1)[i]) / 50.0)
        return FaceDetection(box=box, landmarks=None, score=score)


# --------------------------------------------------------------------------- FAN / S3FD


def _fan_paths(models_dir: Path) -> tuple[Path, Path]:
    base = Path(models_dir) / FACE_ALIGNMENT_DIR
    return base / S3FD_FILENAME, base / FAN_FILENAME


def fan_weights_present(models_dir: Path | str | None) -> bool:
    """True when both face_alignment weight files are in ``<models_dir>/face-alignment/``."""
    if models_dir is None:
        return False
    return all(p.is_file() and p.stat().st_size > 0 for p in _fan_paths(Path(models_dir)))


def _expected_layout(models_dir: Path) -> str:
    return (
        f"expected {models_dir}/{FACE_ALIGNMENT_DIR}/{S3FD_FILENAME} (S3FD face detector) and "
        f"{models_dir}/{FACE_ALIGNMENT_DIR}/{FAN_FILENAME} (2D FAN-4 landmarks), the files "
        "face_alignment downloads from adrianbulat.com"
    )


class FanFaceDetector:
    """S3FD face boxes + FAN 68 landmarks (``face_alignment`` 1.5), weights from the models dir.

    Equivalent to ``face_alignment.FaceAlignment(LandmarksType.TWO_D, face_detector='sfd',
    flip_input=False, compile=False)`` but never downloads: the S3FD weights are passed as
    ``path_to_detector`` and the FAN weights are loaded from the local file in place of
    face_alignment's URL download.

    For speed, S3FD runs on a copy of each frame downscaled to ``detect_max_side`` (longest side;
    None: full size), in sub-batches of ``detect_batch_size``; FAN then runs on the full-resolution
    frame with the rescaled box of the largest face.
    """

    name = "fan"

    def __init__(
        self,
        models_dir: Path | str,
        device: str = "cpu",
        *,
        detect_max_side: int | None = 640,
        detect_batch_size: int = 8,
        filter_threshold: float = 0.5,
    ) -> None:
        models_dir = Path(models_dir)
        s3fd_path, fan_path = _fan_paths(models_dir)
        for p in (s3fd_path, fan_path):
            if not p.is_file():
                raise ModelFilesError(
                    f"face model file {p.name} is missing from {p.parent}; {_expected_layout(models_dir)}"
                )
        self.models_dir = models_dir
        self.device = device
        self.detect_max_side = detect_max_side
        self.detect_batch_size = max(1, int(detect_batch_size))
        self._lock = threading.Lock()
        self._fa = _build_face_alignment(s3fd_path, fan_path, device, filter_threshold)

    # -- public ---------------------------------------------------------------------------

    def detect(self, frames: np.ndarray) -> list[FaceDetection | None]:
        frames = _as_batch(frames)
        if len(frames) == 0:
            return []
        h, w = frames.shape[1:3]
        s = _downscale_factor((h, w), self.detect_max_side)
        out: list[FaceDetection | None] = []
        with self._lock:
            for start in range(0, len(frames), self.detect_batch_size):
                sub = frames[start : start + self.detect_batch_size]
                for frame, boxes in zip(sub, self._detect_boxes(sub, s)):
                    out.append(self._largest_with_landmarks(frame, boxes, s))
        return out

    def landmarks_for_boxes(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """FAN landmarks ``(K, 68, 2)`` float32 for given face boxes ``(K, 4)`` in one RGB frame."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, NUM_LANDMARKS, 2), np.float32)
        with self._lock:
            return self._landmarks(frame, boxes)

    def warmup(self) -> None:
        """Run the whole path once on a blank frame.

        face_alignment's heatmap decoding is numba-jitted without a cache: the first landmark call
        in a process compiles it (several seconds on a small CPU). Call this at service start."""
        frame = np.zeros((64, 64, 3), np.uint8)
        self.landmarks_for_boxes(frame, np.array([[8.0, 8.0, 56.0, 56.0]]))

    # -- internals ------------------------------------------------------------------------

    def _detect_boxes(self, frames: np.ndarray, s: float) -> list[np.ndarray]:
        import torch

        h, w = frames.shape[1:3]
        if s < 1.0:
            size = (max(1, round(w * s)), max(1, round(h * s)))
            small = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
        else:
            small = frames
        tensor = torch.from_numpy(np.ascontiguousarray(small.transpose(0, 3, 1, 2)))
        bboxlists = self._fa.face_detector.detect_from_batch(tensor)
        result = []
        for bl in bboxlists:
            arr = np.asarray(bl, dtype=np.float64).reshape(-1, 5) if len(bl) else np.zeros((0, 5))
            arr = arr[np.all(np.isfinite(arr), axis=1)]
            arr[:, :4] /= s
            arr[:, [0, 2]] = np.clip(arr[:, [0, 2]], 0, w)
            arr[:, [1, 3]] = np.clip(arr[:, [1, 3]], 0, h)
            arr = arr[(arr[:, 2] - arr[:, 0] >= 4) & (arr[:, 3] - arr[:, 1] >= 4)]
            result.append(arr)
        return result

    def _largest_with_landmarks(self, frame: np.ndarray, boxes: np.ndarray, s: float) -> FaceDetection | None:
        if len(boxes) == 0:
            return None
        i = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        box = boxes[i, :4].copy()
        lms = self._landmarks(frame, box[None])
        return FaceDetection(box=box, landmarks=lms[0].astype(np.float64), score=float(boxes[i, 4]))

    def _landmarks(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        dets = [np.array([*b[:4], 1.0]) for b in boxes]
        res = self._fa.get_landmarks_from_image(np.ascontiguousarray(frame), detected_faces=dets)
        if res is None:  # only when dets is empty
            return np.zeros((0, NUM_LANDMARKS, 2), np.float32)
        return np.stack([np.asarray(r, dtype=np.float32)[:, :2] for r in res])


def _build_face_alignment(s3fd_path: Path, fan_path: Path, device: str, filter_threshold: float):
    try:
        import torch
        import face_alignment
        from face_alignment.api import FaceAlignment, LandmarksType
        from face_alignment.models import FAN
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelFilesError(f"the face_alignment package is not installed ({exc})") from exc

    if not hasattr(FaceAlignment, "_load_native"):  # pragma: no cover - guards a version change
        raise ModelFilesError(
            f"face_alignment {getattr(face_alignment, '__version__', '?')} is not supported "
            "(expected 1.5.x): cannot load its weights from local files"
        )

    def load_state_dict(path: Path) -> dict:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelFilesError(f"face model file {path.name} in {path.parent} is unreadable: {exc}") from exc
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ModelFilesError(f"face model file {path.name} in {path.parent} is not a state dict")
        return sd

    class _LocalFaceAlignment(FaceAlignment):
        """FaceAlignment whose FAN weights come from a local file instead of a URL."""

        def _load_native(self, network_name, network_size, device, dtype):  # noqa: D401
            net = FAN(network_size)
            sd = load_state_dict(fan_path)
            try:
                net.load_state_dict({k.replace("module.", "", 1): v for k, v in sd.items()})
            except RuntimeError as exc:
                raise ModelFilesError(
                    f"face model file {fan_path.name} in {fan_path.parent} does not hold 2D FAN-4 weights: "
                    f"{str(exc).splitlines()[0]}"
                ) from exc
            net.to(device, dtype=dtype)
            net.eval()
            return net

    # SFDDetector calls torch.load(path, weights_only=True) itself; check the file first so that a
    # broken file gives a clear error.
    sd = load_state_dict(s3fd_path)
    from face_alignment.detection.sfd.net_s3fd import s3fd

    try:
        s3fd().load_state_dict(sd)
    except RuntimeError as exc:
        raise ModelFilesError(
            f"face model file {s3fd_path.name} in {s3fd_path.parent} does not hold S3FD weights: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    del sd

    return _LocalFaceAlignment(
        LandmarksType.TWO_D,
        device=device,
        flip_input=False,
        face_detector="sfd",
        face_detector_kwargs={"path_to_detector": str(s3fd_path), "filter_threshold": filter_threshold},
        compile=False,
    )


def load_face_detector(kind: str = "auto", models_dir: Path | str | None = None, device: str = "cpu") -> FaceDetector:
    """``auto``: FAN if its weight files are in ``models_dir``, else Haar; ``fan``; ``haar``."""
    kind = (kind or "auto").lower()
    if kind == "auto":
        kind = "fan" if fan_weights_present(models_dir) else "haar"
        if kind == "haar":
            logger.info("face-alignment weights not found in %s: using the Haar face detector", models_dir)
    if kind == "haar":
        return HaarFaceDetector()
    if kind == "fan":
        if models_dir is None:
            raise ModelFilesError("the FAN face detector needs a models directory; " + _expected_layout(Path("<models>")))
        return FanFaceDetector(Path(models_dir), device=device)
    raise ValueError(f"unknown face detector kind {kind!r} (expected 'auto', 'fan' or 'haar')")


# --------------------------------------------------------------------------- crop-box rule


def _normalise_version(version: str) -> str:
    v = str(version).lower().lstrip("v").replace(".", "")
    if v == "15":
        return "v15"
    if v in ("1", "10"):
        return "v1"
    raise ValueError(f"unknown MuseTalk version {version!r} (expected 'v15' or 'v1')")


def musetalk_crop_box(
    det: FaceDetection,
    frame_hw: tuple[int, int],
    *,
    bbox_shift: int = 0,
    version: str = "v15",
    extra_margin: int = 10,
) -> tuple[int, int, int, int]:
    """MuseTalk's crop box ``(x1, y1, x2, y2)`` (ints, end-exclusive, inside the frame).

    With landmarks (cast to int32 as MuseTalk does): x1/x2 = min/max landmark x; the mid line is
    landmark 29's y plus ``bbox_shift`` (v1 only: v1.5 forces bbox_shift to 0); y2 = max landmark
    y; y1 = max(0, mid - (y2 - mid)). If that box is invalid (y2 <= y1, x2 <= x1 or x1 < 0) the
    detector box is used instead.

    Without landmarks (Haar) the same rule runs on landmark positions synthesised from the
    detector box of a frontal face (box x1, y1, width w, height h): jaw x extent = box sides moved
    in by 4 % of w, landmark 29 at y1 + 0.55 h, chin at y1 + 1.15 h. A Haar box runs from the
    forehead to about the lower lip, so this crop reaches below the chin; its top is y1 - 0.05 h
    (the mid line splits the crop in half, as with landmarks).

    v1.5 then moves y2 down by ``extra_margin`` px, capped at the frame height. Finally the box is
    clamped to the frame (and kept at least 1 px wide and tall).
    """
    h_frame, w_frame = int(frame_hw[0]), int(frame_hw[1])
    v = _normalise_version(version)
    shift = int(bbox_shift) if v == "v1" else 0

    box = np.asarray(det.box, dtype=np.float64).reshape(4)
    if det.landmarks is not None and np.all(np.isfinite(det.landmarks)):
        lm = np.asarray(det.landmarks).astype(np.int32)
        min_x, max_x = int(lm[:, 0].min()), int(lm[:, 0].max())
        mid = int(lm[29, 1])
        max_y = int(lm[:, 1].max())
    else:
        bw, bh = box[2] - box[0], box[3] - box[1]
        min_x = int(round(box[0] + HAAR_SIDE_INSET * bw))
        max_x = int(round(box[2] - HAAR_SIDE_INSET * bw))
        mid = int(round(box[1] + HAAR_NOSE_BRIDGE_Y * bh))
        max_y = int(round(box[1] + HAAR_CHIN_Y * bh))
    mid += shift
    half = max_y - mid
    x1, y1, x2, y2 = min_x, max(0, mid - half), max_x, max_y
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        x1, y1, x2, y2 = (int(round(c)) for c in box)
    if v == "v15":
        y2 = min(y2 + int(extra_margin), h_frame)
    return _clamp_box((x1, y1, x2, y2), (h_frame, w_frame))


def _clamp_box(box, frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = frame_hw
    x1, y1, x2, y2 = (int(c) for c in box)
    x1 = min(max(x1, 0), w - 1)
    y1 = min(max(y1, 0), h - 1)
    x2 = min(max(x2, x1 + 1), w)
    y2 = min(max(y2, y1 + 1), h)
    return x1, y1, x2, y2


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
        dets = detector.detect(chunk[sel]) if sel else []
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
        d = detector.detect(last_chunk_tail)[0]
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
