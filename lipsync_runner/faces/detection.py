"""Face detectors: the :class:`FaceDetector` protocol, OpenCV Haar cascades and S3FD + FAN.

Frames are RGB uint8 numpy arrays ``[H, W, 3]``; batches are ``[B, H, W, 3]``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from ..errors import ModelFilesError

logger = logging.getLogger(__name__)

NUM_LANDMARKS = 68
#: Sub-folder of the models directory holding the face_alignment weights.
FACE_ALIGNMENT_DIR = "face-alignment"
#: S3FD face detector weights (a plain state dict), face_alignment's file name.
S3FD_FILENAME = "s3fd-619a316812.pth"
#: 2D FAN (4 hourglass modules) landmark weights (a plain state dict), face_alignment's file name.
FAN_FILENAME = "2DFAN4-11f355bf06.pth.tar"


# --------------------------------------------------------------------------- detections


@dataclass
class FaceDetection:
    """One face found in one frame."""

    box: np.ndarray  # (4,) float x1, y1, x2, y2 in frame pixels
    landmarks: np.ndarray | None  # (68, 2) float x, y in frame pixels (iBUG 68), or None
    score: float  # detector confidence (S3FD: probability; Haar: see HaarFaceDetector)


@runtime_checkable
class FaceDetector(Protocol):
    name: str

    def detect(self, frames: np.ndarray) -> list[list[FaceDetection]]:
        """Every face of each frame of an RGB uint8 batch ``[B, H, W, 3]``, largest box first.

        One list per frame, in frame order; an empty list where a frame has no face."""
        ...


def _suppress_nested(rects: np.ndarray, overlap: float = 0.5) -> list[int]:
    """Indices of the boxes (x, y, w, h; largest first) not lying mostly inside a larger kept one.

    A cascade sometimes reports a face twice at two scales; two real faces overlap far less."""
    keep: list[int] = []
    for i, (x, y, w, h) in enumerate(rects):
        inside = False
        for j in keep:
            kx, ky, kw, kh = rects[j]
            ix = max(0.0, min(x + w, kx + kw) - max(x, kx))
            iy = max(0.0, min(y + h, ky + kh) - max(y, ky))
            if ix * iy > overlap * w * h:
                inside = True
                break
        if not inside:
            keep.append(i)
    return keep


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
    then with the ``default`` one if ``alt2`` found nothing. Hits lying mostly inside a larger hit
    (the same face at two scales) are dropped; the rest are scaled back to frame pixels, largest
    first. ``score`` is the cascade's neighbour count for a hit divided by 50, capped at 1 (a rough
    confidence, not a probability).
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

    def detect(self, frames: np.ndarray) -> list[list[FaceDetection]]:
        frames = _as_batch(frames)
        return [self._detect_one(f) for f in frames]

    def _detect_one(self, frame: np.ndarray) -> list[FaceDetection]:
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
                return []
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
        neighbours = np.asarray(neighbours, dtype=np.float64).reshape(-1)
        order = np.argsort(-(rects[:, 2] * rects[:, 3]), kind="stable")
        rects, neighbours = rects[order], neighbours[order]
        out = []
        for i in _suppress_nested(rects):
            x, y, bw, bh = rects[i]
            box = np.array([x, y, x + bw, y + bh], dtype=np.float64) / s
            box[[0, 2]] = np.clip(box[[0, 2]], 0, w)
            box[[1, 3]] = np.clip(box[[1, 3]], 0, h)
            out.append(FaceDetection(box=box, landmarks=None, score=min(1.0, neighbours[i] / 50.0)))
        return out


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
    frame with the rescaled boxes of the ``max_faces`` largest faces S3FD finds above
    ``filter_threshold`` (each face costs one FAN pass: a crowd in the background is not worth it).
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
        max_faces: int = 4,
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
        self.max_faces = max(1, int(max_faces))
        self._lock = threading.Lock()
        self._fa = _build_face_alignment(s3fd_path, fan_path, device, filter_threshold)

    # -- public ---------------------------------------------------------------------------

    def detect(self, frames: np.ndarray) -> list[list[FaceDetection]]:
        frames = _as_batch(frames)
        if len(frames) == 0:
            return []
        h, w = frames.shape[1:3]
        s = _downscale_factor((h, w), self.detect_max_side)
        out: list[list[FaceDetection]] = []
        with self._lock:
            for start in range(0, len(frames), self.detect_batch_size):
                sub = frames[start : start + self.detect_batch_size]
                for frame, boxes in zip(sub, self._detect_boxes(sub, s)):
                    out.append(self._largest_with_landmarks(frame, boxes))
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

    def _largest_with_landmarks(self, frame: np.ndarray, boxes: np.ndarray) -> list[FaceDetection]:
        if len(boxes) == 0:
            return []
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        boxes = boxes[np.argsort(-area, kind="stable")[: self.max_faces]]
        lms = self._landmarks(frame, boxes[:, :4])
        return [FaceDetection(box=b[:4].copy(), landmarks=lm.astype(np.float64), score=float(b[4]))
                for b, lm in zip(boxes, lms)]

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
    """``auto``: FAN if its weight files are in ``models_dir``, else MediaPipe (real landmarks, no
    download) if it is installed, else Haar; or ``fan``, ``mediapipe``, ``haar`` by name."""
    from .mediapipe_detector import MediaPipeFaceDetector, mediapipe_available

    kind = (kind or "auto").lower()
    if kind == "auto":
        if fan_weights_present(models_dir):
            kind = "fan"
        elif mediapipe_available():
            kind = "mediapipe"
        else:
            kind = "haar"
            logger.warning("neither face-alignment weights in %s nor mediapipe: using the Haar face detector "
                           "(no landmarks)", models_dir)
    if kind == "haar":
        return HaarFaceDetector()
    if kind == "mediapipe":
        return MediaPipeFaceDetector()
    if kind == "fan":
        if models_dir is None:
            raise ModelFilesError("the FAN face detector needs a models directory; " + _expected_layout(Path("<models>")))
        return FanFaceDetector(Path(models_dir), device=device)
    raise ValueError(f"unknown face detector kind {kind!r} (expected 'auto', 'fan', 'mediapipe' or 'haar')")
