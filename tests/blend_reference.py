"""The face crop and blend as they were before the per-frame cost work (issue 16), verbatim.

Kept as the reference that tests/test_blend.py and tests/test_gpu_ops.py hold the optimised code
to: output frames must stay identical (or within 1 of 255 where an op changed on purpose).
Do not "improve" this file.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

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


def crop_face(frame: np.ndarray, box, size: int = CROP_SIZE) -> np.ndarray:
    """One frame's face crop, resized with Lanczos (as MuseTalk) to ``size`` x ``size``."""
    x1, y1, x2, y2 = clip_box(box, frame.shape[:2])
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty crop box {tuple(int(c) for c in box)} for a frame of {frame.shape[:2]}")
    return cv2.resize(frame[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LANCZOS4)


def crop_faces(frames: np.ndarray, boxes: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Face crops ``[B, size, size, 3]`` uint8 of a batch; all-zero crops for no-face (-1) rows."""
    frames = np.asarray(frames)
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(frames) != len(boxes):
        raise ValueError(f"{len(frames)} frames but {len(boxes)} boxes")
    out = np.zeros((len(frames), size, size, frames.shape[-1]), dtype=np.uint8)
    for i, (frame, box) in enumerate(zip(frames, boxes)):
        if box_is_valid(box):
            out[i] = crop_face(frame, box, size)
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


#: Fraction of the box height above which the mask is always 0 (MuseTalk v1.5: 0.5).
UPPER_RATIO = 0.5
#: Gaussian feather kernel size as a fraction of the box's larger side.
FEATHER = 0.08


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


def lower_face_mask(
    box_hw: tuple[int, int],
    landmarks_in_box: np.ndarray | None = None,
    *,
    upper_ratio: float = UPPER_RATIO,
    feather: float = FEATHER,
) -> np.ndarray:
    """Feathered lower-face mask ``float32 [h, w]`` in [0, 1] for a crop box of size ``box_hw``.

    ``landmarks_in_box``: (68, 2) iBUG landmarks in box coordinates (frame landmarks minus the
    box's x1, y1), or None / non-finite for the landmark-free ellipse. Rows above
    ``upper_ratio * h`` are exactly 0; the box border (sides and bottom) is exactly 0.
    """
    h, w = int(box_hw[0]), int(box_hw[1])
    if h <= 0 or w <= 0:
        return np.zeros((max(h, 0), max(w, 0)), np.float32)
    k = _odd(feather * max(h, w))
    r = k // 2
    top = upper_ratio * h

    canvas = np.zeros((h, w), np.uint8)
    lm = None if landmarks_in_box is None else np.asarray(landmarks_in_box, dtype=np.float64)
    if lm is not None and lm.shape == (68, 2) and np.all(np.isfinite(lm)):
        jaw = lm[2:15]
        y_close = max(top, float(lm[29, 1]))
        poly = np.concatenate([[[jaw[0, 0], y_close]], jaw, [[jaw[-1, 0], y_close]]])
        cv2.fillPoly(canvas, [np.rint(poly * 16).astype(np.int32)], 255, lineType=cv2.LINE_AA, shift=4)
    else:
        # mouth and chin of a frontal face in a MuseTalk crop box: the box's middle row is about
        # the nose bridge, the chin close to the bottom
        center = (int(round(w * 0.5 * 16)), int(round(h * 0.70 * 16)))
        axes = (int(round(w * 0.36 * 16)), int(round(h * 0.26 * 16)))
        cv2.ellipse(canvas, center, axes, 0, 0, 360, 255, thickness=-1, lineType=cv2.LINE_AA, shift=4)
    mask = cv2.GaussianBlur(canvas, (k, k), 0).astype(np.float32) * (1.0 / 255.0)

    # smooth ramp from 0 at the top boundary to 1 one kernel below it
    ys = (np.arange(h, dtype=np.float32) + 0.5 - top) / max(k, 1)
    ramp_y = np.clip(ys, 0.0, 1.0)
    ramp_y = ramp_y * ramp_y * (3 - 2 * ramp_y)
    # taper to 0 at the sides and the bottom (over half a kernel)
    t = max(r, 1)
    xs = np.arange(w, dtype=np.float32)
    ramp_x = np.clip(np.minimum(xs, w - 1 - xs) / t, 0.0, 1.0)
    ramp_bottom = np.clip((h - 1 - np.arange(h, dtype=np.float32)) / t, 0.0, 1.0)
    mask *= (ramp_y * ramp_bottom)[:, None]
    mask *= ramp_x[None, :]
    mask[mask < 1.0 / 512] = 0.0  # below half a grey level: exactly unchanged
    return mask


def blend_faces(
    frames: np.ndarray,
    faces: np.ndarray,
    boxes: np.ndarray,
    landmarks: np.ndarray | None = None,
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    inplace: bool = False,
    upper_ratio: float = UPPER_RATIO,
    feather: float = FEATHER,
) -> np.ndarray:
    """Paste generated faces ``[B, s, s, 3]`` into frames ``[B, H, W, 3]`` at ``boxes`` ``[B, 4]``.

    ``landmarks``: ``[B, 68, 2]`` in frame pixels (NaN rows allowed) or None. Frames whose box row
    is invalid (-1: no face) are left as they are. ``masks``: optional precomputed
    :func:`lower_face_mask` per frame (matching the box size), e.g. from a per-video cache.

    Returns a new array, or ``frames`` itself modified in place with ``inplace=True`` (cheaper:
    only the blended rectangles are written).
    """
    frames = np.asarray(frames)
    out = frames if inplace else frames.copy()
    boxes = np.asarray(boxes).reshape(-1, 4)
    if not (len(out) == len(faces) == len(boxes)):
        raise ValueError(f"{len(out)} frames, {len(faces)} faces and {len(boxes)} boxes")
    H, W = out.shape[1:3]
    for i in range(len(out)):
        box = boxes[i]
        if not box_is_valid(box):
            continue
        x1, y1, x2, y2 = clip_box(box, (H, W))
        if x2 <= x1 or y2 <= y1:
            continue
        h, w = y2 - y1, x2 - x1
        mask = None if masks is None else masks[i]
        if mask is None:
            lm = None
            if landmarks is not None:
                lm_i = np.asarray(landmarks[i], dtype=np.float64)
                if np.all(np.isfinite(lm_i)):
                    lm = lm_i - np.array([x1, y1], dtype=np.float64)
            mask = lower_face_mask((h, w), lm, upper_ratio=upper_ratio, feather=feather)
        elif mask.shape != (h, w):
            raise ValueError(f"mask {mask.shape} does not match box size {(h, w)}")
        rows = np.flatnonzero(mask.any(axis=1))
        if len(rows) == 0:
            continue
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        face = resize_to_box(np.asarray(faces[i]), (x1, y1, x2, y2))[r0:r1, c0:c1].astype(np.float32)
        region = out[i, y1 + r0 : y1 + r1, x1 + c0 : x1 + c1]
        m = mask[r0:r1, c0:c1, None]
        base = region.astype(np.float32)
        base += m * (face - base)
        base += 0.5
        region[...] = base.astype(np.uint8)  # truncation after +0.5: rounding; m == 0 -> unchanged
    return out
