"""The face detector a deployment asks for (``LIP_SYNC_FACE_DETECTOR``), or the best one installed."""

from __future__ import annotations

import logging
from pathlib import Path

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.faces.detectors.base import FaceDetector
from lipsync_runner.faces.detectors.fan import FanFaceDetector, _expected_layout, fan_weights_present
from lipsync_runner.faces.detectors.haar import HaarFaceDetector

logger = logging.getLogger(__name__)


def load_face_detector(kind: str = "auto", models_dir: Path | str | None = None, device: str = "cpu") -> FaceDetector:
    """``auto``: FAN if its weight files are in ``models_dir``, else MediaPipe (real landmarks, no
    download) if it is installed, else Haar; or ``fan``, ``mediapipe``, ``haar`` by name."""
    from lipsync_runner.faces.detectors.mediapipe import MediaPipeFaceDetector, mediapipe_available

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
