"""Who is speaking: mouth motion against the audio's loudness over time (``face=speaker``).

A speaker's mouth opens with the syllables and closes in the pauses, so over a few seconds the
mouth opening of the person who speaks follows the loudness of the speech, and a listener's does
not. Each face gets one number per detected frame (:func:`mouth_measure`) and the audio one per
video frame (:func:`audio_envelope`); the person whose measure correlates best with the envelope
(:func:`speech_correlation`) is the speaker.
"""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np

from lipsync_runner.faces.detectors.base import FaceDetection

# iBUG 68 points (0-based): inner lips top / bottom middle, nose top, chin
_INNER_TOP, _INNER_BOTTOM, _NOSE_TOP, _CHIN = 62, 66, 27, 8
# Where the mouth lies in a MuseTalk crop box (fractions of its width / height). Both crop rules
# put the nose bridge at half height and the chin near the bottom, so the mouth sits at about
# 3/4 of the height whether the box came from landmarks or from a Haar box.
_MOUTH_X = (0.3, 0.7)
_MOUTH_Y = (0.66, 0.9)
MIN_SAMPLES = 8  # fewer frames in common with the audio: no opinion


def mouth_measure(frame: np.ndarray, det: FaceDetection, crop: tuple[int, int, int, int] | np.ndarray) -> float:
    """How open the mouth of ``det`` is in ``frame`` (RGB ``[H, W, 3]``); larger: more open.

    With landmarks: the gap between the inner lips over the nose-to-chin height. Without (Haar):
    the darkness of the mouth area of the crop box (an open mouth shows the dark mouth cavity).
    Only compared within one person over time, so the two kinds never meet.
    """
    lm = det.landmarks
    if lm is not None and np.isfinite(lm).all():
        lm = np.asarray(lm, np.float64)
        height = np.linalg.norm(lm[_CHIN] - lm[_NOSE_TOP])
        return float(np.linalg.norm(lm[_INNER_BOTTOM] - lm[_INNER_TOP]) / max(height, 1e-6))
    x1, y1, x2, y2 = (float(c) for c in crop)
    w, h = x2 - x1, y2 - y1
    xa, xb = int(round(x1 + _MOUTH_X[0] * w)), int(round(x1 + _MOUTH_X[1] * w))
    ya, yb = int(round(y1 + _MOUTH_Y[0] * h)), int(round(y1 + _MOUTH_Y[1] * h))
    patch = frame[max(ya, 0) : max(yb, ya + 1), max(xa, 0) : max(xb, xa + 1)]
    if patch.size == 0:
        return float("nan")
    return float(255.0 - cv2.cvtColor(np.ascontiguousarray(patch), cv2.COLOR_RGB2GRAY).mean())


def audio_envelope(pcm: np.ndarray, fps: Fraction | float, n_frames: int | None = None,
                   sample_rate: int = 16000) -> np.ndarray:
    """RMS of mono PCM per video frame: frame i covers samples [i * rate / fps, (i + 1) * rate / fps).

    ``n_frames`` defaults to the whole frames the audio holds; frames past the audio's end get 0.
    Exact for fractional rates (29.97): the boundaries come from integer arithmetic.
    """
    pcm = np.asarray(pcm, dtype=np.float64).reshape(-1)
    fps = Fraction(fps).limit_denominator(1_000_000)
    if n_frames is None:
        n_frames = int(len(pcm) * fps / sample_rate)
    edges = np.array([min(len(pcm), (i * sample_rate * fps.denominator) // fps.numerator)
                      for i in range(n_frames + 1)], dtype=np.int64)
    energy = np.concatenate([[0.0], np.cumsum(pcm * pcm)])
    count = np.diff(edges)
    total = energy[edges[1:]] - energy[edges[:-1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.sqrt(np.maximum(total, 0) / np.maximum(count, 1)), 0.0)


def speech_correlation(frames: np.ndarray, mouth: np.ndarray, envelope: np.ndarray) -> float:
    """Pearson correlation of one person's mouth measure (at ``frames``) with the audio envelope.

    Only frames the audio covers and with a known measure count; fewer than MIN_SAMPLES of them,
    or a measure that never changes: 0 (no evidence either way)."""
    frames = np.asarray(frames, np.int64)
    mouth = np.asarray(mouth, np.float64)
    envelope = np.asarray(envelope, np.float64)
    ok = (frames < len(envelope)) & np.isfinite(mouth)
    ok[ok] &= np.isfinite(envelope[frames[ok]])  # NaN: a frame the audio does not judge (outside a segment)
    if ok.sum() < MIN_SAMPLES:
        return 0.0
    a, b = mouth[ok], envelope[frames[ok]]
    if a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])
