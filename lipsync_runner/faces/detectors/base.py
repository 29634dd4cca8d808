"""What every face detector is: the :class:`FaceDetector` protocol, its detections, batch helpers.

Frames are RGB uint8 numpy arrays ``[H, W, 3]``; batches are ``[B, H, W, 3]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


NUM_LANDMARKS = 68


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


def as_batch(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [B,H,W,3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    return frames


def downscale_factor(hw: tuple[int, int], max_side: int | None) -> float:
    if not max_side:
        return 1.0
    longest = max(hw)
    return min(1.0, max_side / float(longest))


