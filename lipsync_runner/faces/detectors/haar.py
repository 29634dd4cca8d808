"""OpenCV Haar cascades: the offline default detector (no model files), boxes only."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.faces.detectors.base import FaceDetection, as_batch, downscale_factor


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
        frames = as_batch(frames)
        return [self._detect_one(f) for f in frames]

    def _detect_one(self, frame: np.ndarray) -> list[FaceDetection]:
        h, w = frame.shape[:2]
        s = downscale_factor((h, w), self.detect_max_side)
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
