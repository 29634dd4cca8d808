"""Face detection, MuseTalk's crop-box rule and temporal tracking.

Frames are RGB uint8 numpy arrays ``[H, W, 3]``; batches are ``[B, H, W, 3]``.

* :mod:`.detection`: the :class:`FaceDetector` protocol and its two detectors.
  :class:`FanFaceDetector` gives S3FD boxes + FAN 68-point (iBUG) landmarks from the
  ``face_alignment`` package, weights read from ``<models_dir>/face-alignment/`` (never
  downloaded); :class:`HaarFaceDetector` uses OpenCV's bundled Haar cascades, boxes only.
  :func:`load_face_detector` picks one.
* :mod:`.boxes`: :func:`musetalk_crop_box`, MuseTalk's crop rule, from landmarks or (Haar) from
  landmark positions synthesised from the detector box.
* :mod:`.tracking`: :func:`track_faces` consumes a stream of frame chunks and returns a
  :class:`FaceTrack`: one crop box per frame, smoothed over time, frames without a face flagged.
"""

from .boxes import HAAR_CHIN_Y, HAAR_NOSE_BRIDGE_Y, HAAR_SIDE_INSET, musetalk_crop_box
from .detection import (
    FACE_ALIGNMENT_DIR,
    FAN_FILENAME,
    NUM_LANDMARKS,
    S3FD_FILENAME,
    FaceDetection,
    FaceDetector,
    FanFaceDetector,
    HaarFaceDetector,
    fan_weights_present,
    load_face_detector,
)
from .tracking import FaceTrack, track_faces

__all__ = [
    "FACE_ALIGNMENT_DIR",
    "FAN_FILENAME",
    "HAAR_CHIN_Y",
    "HAAR_NOSE_BRIDGE_Y",
    "HAAR_SIDE_INSET",
    "NUM_LANDMARKS",
    "S3FD_FILENAME",
    "FaceDetection",
    "FaceDetector",
    "FaceTrack",
    "FanFaceDetector",
    "HaarFaceDetector",
    "fan_weights_present",
    "load_face_detector",
    "musetalk_crop_box",
    "track_faces",
]
