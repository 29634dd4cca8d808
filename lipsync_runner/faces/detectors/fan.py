"""S3FD face boxes and FAN landmarks (face_alignment), weights from the models directory."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.faces.detectors.base import NUM_LANDMARKS, FaceDetection, as_batch, downscale_factor

logger = logging.getLogger(__name__)

#: Sub-folder of the models directory holding the face_alignment weights.
FACE_ALIGNMENT_DIR = "face-alignment"
#: S3FD face detector weights (a plain state dict), face_alignment's file name.
S3FD_FILENAME = "s3fd-619a316812.pth"
#: 2D FAN (4 hourglass modules) landmark weights (a plain state dict), face_alignment's file name.
FAN_FILENAME = "2DFAN4-11f355bf06.pth.tar"


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
        frames = as_batch(frames)
        if len(frames) == 0:
            return []
        h, w = frames.shape[1:3]
        s = downscale_factor((h, w), self.detect_max_side)
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
