"""Face crops for MuseTalk: cut the crop box out of a frame and resize it to 256x256.

Frames are RGB uint8 ``[B, H, W, 3]``; boxes are int ``[B, 4]`` rows ``x1, y1, x2, y2``
(end-exclusive, as :func:`lipsync_runner.faces.track_faces` returns them, rows of -1 where there is
no face).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

#: MuseTalk's face crop size.
CROP_SIZE = 256


def box_is_valid(box: np.ndarray | tuple[int, int, int, int]) -> bool:
    """True for a box with positive width and height and no negative coordinate (a no-face row is -1)."""
    x1, y1, x2, y2 = (int(c) for c in box)
    return x1 >= 0 and y1 >= 0 and x2 > x1 and y2 > y1


def clip_box(box, frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """Box clipped to the frame (ints, end-exclusive); may come out empty."""
    h, w = frame_hw
    x1, y1, x2, y2 = (int(c) for c in box)
    return max(0, x1), max(0, y1), min(w, x2), min(h, y2)


def crop_face(frame: np.ndarray, box, size: int = CROP_SIZE, out: np.ndarray | None = None) -> np.ndarray:
    """One frame's face crop, resized with Lanczos (as MuseTalk) to ``size`` x ``size``.

    Only the box region is read (a view, no copy); ``out``: a ``[size, size, C]`` uint8 array to
    write into (e.g. a row of a batch).
    """
    x1, y1, x2, y2 = clip_box(box, frame.shape[:2])
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty crop box {tuple(int(c) for c in box)} for a frame of {frame.shape[:2]}")
    # Lanczos is the costly part of a cold frame's CPU work (3 ms for a 720p face box, measured in
    # docs/benchmarks.md against cubic, area and float32 Lanczos) and is kept: it is MuseTalk's
    # filter, the model was trained on it, and a warm avatar cache skips crops altogether.
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), dst=out, interpolation=cv2.INTER_LANCZOS4)


def crop_faces(frames: np.ndarray | Sequence[np.ndarray], boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Face crops ``[B, size, size, 3]`` uint8 of a batch; all-zero crops for no-face (-1) rows.

    ``frames``: ``[B, H, W, C]``, or a list of ``[H, W, C]`` frames (e.g. views of some rows of a
    chunk: nothing but the boxes is copied).
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(frames) != len(boxes):
        raise ValueError(f"{len(frames)} frames but {len(boxes)} boxes")
    channels = frames[0].shape[-1] if len(frames) else 3
    out = np.zeros((len(frames), size, size, channels), dtype=np.uint8)
    for i, box in enumerate(boxes):
        if box_is_valid(box):
            crop_face(np.asarray(frames[i]), box, size, out=out[i])
    return out


def resize_to_box(face: np.ndarray, box) -> np.ndarray:
    """A generated face (e.g. 256x256) resized to the box's size: area filter when shrinking,
    bilinear when enlarging (MuseTalk uses bilinear)."""
    x1, y1, x2, y2 = (int(c) for c in box)
    w, h = x2 - x1, y2 - y1
    if face.shape[0] == h and face.shape[1] == w:
        return face
    shrink = w < face.shape[1] and h < face.shape[0]
    return cv2.resize(face, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
