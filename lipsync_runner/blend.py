"""Paste generated 256x256 faces back into their frames with a feathered lower-face mask.

MuseTalk generates only the lower half of its 256x256 crop (the upper half is a VAE
reconstruction of the reference), and v1.5 keeps only the lower half of the face region
(``upper_boundary_ratio`` 0.5) feathered with a Gaussian blur. This module does the same without a
face-parsing network:

* with landmarks: the region inside the jaw contour (iBUG points 2..14) closed by a horizontal
  line at the nose bridge (landmark 29) or the box's middle row, whichever is lower;
* without landmarks: an ellipse over mouth and chin in the lower half of the box.

The mask is then blurred, forced to 0 above the box's middle row with a smooth ramp below it, and
tapered to 0 at the box's sides and bottom so no hard edge is left at the box border. Only the
bounding rectangle of the mask's non-zero pixels inside the box is touched: every pixel where the
mask is 0, and everything outside the box, stays bit-identical to the input frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .crops import box_is_valid, clip_box, resize_to_box

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
    weights: np.ndarray | None = None,
    inplace: bool = False,
    upper_ratio: float = UPPER_RATIO,
    feather: float = FEATHER,
) -> np.ndarray:
    """Paste generated faces ``[B, s, s, 3]`` into frames ``[B, H, W, 3]`` at ``boxes`` ``[B, 4]``.

    ``landmarks``: ``[B, 68, 2]`` in frame pixels (NaN rows allowed) or None. Frames whose box row
    is invalid (-1: no face) are left as they are. ``masks``: optional precomputed
    :func:`lower_face_mask` per frame (matching the box size), e.g. from a per-video cache.
    ``weights``: ``[B]`` in [0, 1] scaling each frame's mask (cross-fades: 1 = generated, 0 = source).

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
        if weights is not None and weights[i] < 1:
            m = m * np.float32(weights[i])
        base = region.astype(np.float32)
        base += m * (face - base)
        base += 0.5
        region[...] = base.astype(np.uint8)  # truncation after +0.5: rounding; m == 0 -> unchanged
    return out
