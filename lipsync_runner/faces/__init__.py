"""Face detection, identity tracks, the choice of face, MuseTalk's crop-box rule and smoothing.

Frames are RGB uint8 numpy arrays ``[H, W, 3]``; batches are ``[B, H, W, 3]``.

* :mod:`.detection`: the :class:`FaceDetector` protocol (every face per frame, largest first)
  and its detectors. :class:`FanFaceDetector` gives S3FD boxes + FAN 68-point (iBUG) landmarks
  from the ``face_alignment`` package, weights read from ``<models_dir>/face-alignment/`` (never
  downloaded); :class:`HaarFaceDetector` uses OpenCV's bundled Haar cascades, boxes only.
  :func:`load_face_detector` picks one.
* :mod:`.boxes`: :func:`musetalk_crop_box`, MuseTalk's crop rule, from landmarks or (Haar) from
  landmark positions synthesised from the detector box.
* :mod:`.identity`: :class:`IdentityTracker` joins detections across frames into one track per
  person (:class:`FaceTracks`), surviving short misses and occlusions.
* :mod:`.choice`: :class:`FaceChoice` (``face``, ``face_point``, ``face_boxes``) and
  :func:`choose_track`: the chosen person's :class:`FaceTrack`.
* :mod:`.speaker`: mouth opening per face and the audio envelope per frame, for ``face=speaker``.
* :mod:`.smoothing`: a zero-lag One-Euro filter for crop boxes and landmarks.
* :mod:`.tracking`: :func:`track_faces`, pass 1 of a job: a stream of frame chunks in, the
  chosen person's :class:`FaceTrack` out (:func:`find_tracks` then :func:`choose_track`).
"""

from lipsync_runner.faces.boxes import HAAR_CHIN_Y, HAAR_NOSE_BRIDGE_Y, HAAR_SIDE_INSET, musetalk_crop_box
from lipsync_runner.faces.choice import FACE_RULES, FaceChoice, FaceTrack, choose_track, explicit_track, segment_envelope
from lipsync_runner.faces.detectors.fan import (
    FACE_ALIGNMENT_DIR,
    FAN_FILENAME,
    S3FD_FILENAME,
    FanFaceDetector,
    fan_weights_present,
)
from lipsync_runner.faces.detectors.base import NUM_LANDMARKS, FaceDetection, FaceDetector
from lipsync_runner.faces.detectors.haar import HaarFaceDetector
from lipsync_runner.faces.detectors.load import load_face_detector
from lipsync_runner.faces.identity import FaceTracks, IdentityTrack, IdentityTracker, TrackerSettings
from lipsync_runner.faces.smoothing import OneEuro, one_euro
from lipsync_runner.faces.speaker import audio_envelope, mouth_measure, speech_correlation
from lipsync_runner.faces.tracking import find_tracks, track_faces

__all__ = [
    "FACE_ALIGNMENT_DIR",
    "FACE_RULES",
    "FAN_FILENAME",
    "HAAR_CHIN_Y",
    "HAAR_NOSE_BRIDGE_Y",
    "HAAR_SIDE_INSET",
    "NUM_LANDMARKS",
    "S3FD_FILENAME",
    "FaceChoice",
    "FaceDetection",
    "FaceDetector",
    "FaceTrack",
    "FaceTracks",
    "FanFaceDetector",
    "HaarFaceDetector",
    "IdentityTrack",
    "IdentityTracker",
    "OneEuro",
    "TrackerSettings",
    "audio_envelope",
    "choose_track",
    "explicit_track",
    "fan_weights_present",
    "find_tracks",
    "load_face_detector",
    "mouth_measure",
    "musetalk_crop_box",
    "one_euro",
    "segment_envelope",
    "speech_correlation",
    "track_faces",
]
