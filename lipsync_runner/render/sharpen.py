"""Detail-preserving paste: put back the fine detail a 256x256 face loses when scaled up to a big box.

MuseTalk generates every face at 256x256. In 1080p video a face box is often 400-600 px wide, so
the pasted face is an upscaled 256 image: everything finer than the 256 grid (skin texture,
stubble, sharp edges) is gone and the lower face looks soft next to the untouched upper face.

``sharpen`` = a in (0, 1] adds that band back, per face, before the blend:

* outside the mouth zone, the face's band above the 256 grid is replaced by the *source frame's*:
  ``G(face) + (src - G(src))`` at a = 1, where G is a Gaussian low-pass matched to the scale
  factor (sigma = 0.6 x box width / 256, about one 256-grid pixel's resampling kernel). The
  generated face reproduces the source there (cheeks, chin, nasolabial folds), so this restores
  its real texture, not an invented one;
* inside the mouth zone (lips and the moving jaw, from the landmarks; an ellipse without them),
  where the generated content differs from the source, an unsharp mask of the generated face at
  the same scale: ``face + (face - G(face))``.

Both are weighted by a; the zones blend smoothly. Boxes no wider than 256 px lose nothing and are
left as they are; so is everything with ``sharpen=0`` (the default).
"""

from __future__ import annotations

import cv2
import numpy as np

from lipsync_runner.render.crops import CROP_SIZE, box_is_valid, clip_box, resize_to_box

#: The Gaussian low-pass sigma in 256-grid pixels.
GRID_SIGMA = 0.6
#: Unsharp gain inside the mouth zone (at sharpen = 1).
UNSHARP_GAIN = 1.0


def mouth_zone(box_hw: tuple[int, int], landmarks_in_box: np.ndarray | None) -> np.ndarray:
    """float32 [h, w] weight, 1 where the generated mouth and jaw move, smoothly 0 elsewhere."""
    h, w = box_hw
    zone = np.zeros((h, w), np.uint8)
    lm = None if landmarks_in_box is None else np.asarray(landmarks_in_box, np.float64)
    if lm is not None and lm.shape == (68, 2) and np.all(np.isfinite(lm)):
        pts = np.concatenate([lm[48:60], lm[4:13]])  # lips and the lower jaw (the chin moves with them)
        hull = cv2.convexHull(np.rint(pts * 16).astype(np.int32))
        cv2.fillConvexPoly(zone, hull, 255, lineType=cv2.LINE_AA, shift=4)
    else:
        cv2.ellipse(zone, (int(w * 0.5), int(h * 0.72)), (max(1, int(w * 0.3)), max(1, int(h * 0.25))), 0, 0, 360,
                    255, thickness=-1)
    k = max(3, int(0.08 * max(h, w)) | 1)
    zone = cv2.dilate(zone, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    return cv2.GaussianBlur(zone, (2 * k + 1, 2 * k + 1), 0).astype(np.float32) * (1.0 / 255.0)


def restore_detail(frames: np.ndarray, faces: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray | None,
                   amount: float) -> list[np.ndarray]:
    """Generated faces ``[B, 256, 256, 3]`` -> per-frame faces resized to their (frame-clipped)
    boxes, with the detail above the 256 grid restored (see module doc). ``blend_faces`` takes
    the list in place of ``faces`` (a face already at box size is pasted as it is)."""
    frames = np.asarray(frames)
    out: list[np.ndarray] = []
    for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
        face = np.asarray(faces[i])
        if not box_is_valid(box):
            out.append(face)
            continue
        x1, y1, x2, y2 = clip_box(box, frames.shape[1:3])
        up = resize_to_box(face, (x1, y1, x2, y2))
        scale = (x2 - x1) / float(face.shape[1] or CROP_SIZE)
        if amount <= 0 or scale <= 1.0:
            out.append(up)
            continue
        sigma = GRID_SIGMA * scale
        src = frames[i, y1:y2, x1:x2].astype(np.float32)
        gen = up.astype(np.float32)
        source_band = src - cv2.GaussianBlur(src, (0, 0), sigma)
        own_band = gen - cv2.GaussianBlur(gen, (0, 0), sigma)
        lm = None
        if landmarks is not None:
            lm = np.asarray(landmarks[i], np.float64) - (x1, y1)
        zone = mouth_zone((y2 - y1, x2 - x1), lm)[..., None]
        # outside: the face's own (attenuated) band is replaced by the source's; inside: unsharp
        gen += float(amount) * ((1.0 - zone) * (source_band - own_band) + zone * UNSHARP_GAIN * own_band)
        out.append(np.clip(gen + 0.5, 0, 255).astype(np.uint8))
    return out
