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

Per-frame cost: a mask depends only on the box size (ellipse) or on the box size and the
landmarks as ``cv2.fillPoly`` sees them (1/16 px fixed point), so masks are kept in an LRU cache
bounded in bytes, as the bounding rectangle of their non-zero pixels; only that rectangle of the
frame is read, converted and written. The results are bit-identical to computing every mask per
frame.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from cachetools import LRUCache, cached

from lipsync_runner.render.crops import box_is_valid, clip_box, resize_to_box

#: Fraction of the box height above which the mask is always 0 (MuseTalk v1.5: 0.5).
UPPER_RATIO = 0.5
#: Gaussian feather kernel size as a fraction of the box's larger side.
FEATHER = 0.08
#: Bytes of blend masks kept per process (an LRU shared by the box sizes and jaw shapes in use):
#: a 720p face box's mask is about 70 KB, a 1080p one 150 KB.
MASK_CACHE_BYTES = 64 * 2**20


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


@dataclass(frozen=True)
class BoxMask:
    """A box's mask: its size, and the rectangle ``rows r0:r1, cols c0:c1`` outside which it is 0
    (empty when r0 == r1), kept as ``rect`` float32 (read-only, shared): blending reads and
    writes only that rectangle."""

    shape: tuple[int, int]
    rect: np.ndarray
    r0: int
    r1: int
    c0: int
    c1: int

    @classmethod
    def of(cls, mask: np.ndarray, *, shape: tuple[int, int] | None = None, row0: int = 0) -> BoxMask:
        """From a mask, or from its rows ``row0:`` of a mask of ``shape`` (the rows above are 0)."""
        shape = (int(mask.shape[0]), int(mask.shape[1])) if shape is None else (int(shape[0]), int(shape[1]))
        rows = np.flatnonzero(mask.any(axis=1))
        if len(rows) == 0:
            return cls(shape, np.zeros((0, 0), np.float32), 0, 0, 0, 0)
        cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        rect = np.ascontiguousarray(mask[r0:r1, c0:c1], dtype=np.float32)
        rect.setflags(write=False)
        return cls(shape, rect, r0 + row0, r1 + row0, c0, c1)

    @property
    def empty(self) -> bool:
        return self.r1 <= self.r0

    @property
    def nbytes(self) -> int:
        return self.rect.nbytes + 200

    @property
    def mask(self) -> np.ndarray:
        """The whole mask ``float32 [h, w]`` (a new array)."""
        full = np.zeros(self.shape, np.float32)
        full[self.r0 : self.r1, self.c0 : self.c1] = self.rect
        return full

    def weights(self, scale: float = 1.0) -> np.ndarray:
        """The non-zero rectangle as ``[r, c, 1]`` float32, times ``scale`` (a cross-fade weight)."""
        sub = self.rect[:, :, None]
        return sub if scale == 1.0 else sub * np.float32(scale)


_MASKS: LRUCache = LRUCache(maxsize=MASK_CACHE_BYTES, getsizeof=lambda bm: bm.nbytes)
_MASKS_LOCK = threading.Lock()


def _feathered(canvas: np.ndarray, h: int, w: int, upper_ratio: float, feather: float) -> BoxMask:
    """Blur the drawn shape and apply the top ramp and the border taper (see the module docstring)."""
    k = _odd(feather * max(h, w))
    r = k // 2
    top = upper_ratio * h
    # The top ramp zeroes every row above ceil(top - 0.5), whatever the blur gives it, so only the
    # rows from there down, plus the kernel's reach r above them, are computed at all. cv2's 8-bit
    # Gaussian is separable and bit-exact, so those rows equal the whole-canvas blur's; the r rows
    # at the cut see a reflected border instead, and the ramp zeroes them. Every other step is
    # elementwise: the result is the whole-box computation's, bit for bit.
    t0 = max(0, math.ceil(top - 0.5) - r)
    if t0 >= h:
        return BoxMask.of(np.zeros((h, w), np.float32))
    mask = cv2.GaussianBlur(canvas[t0:], (k, k), 0).astype(np.float32)
    mask *= np.float32(1.0 / 255.0)
    rows = np.arange(t0, h, dtype=np.float32)

    # smooth ramp from 0 at the top boundary to 1 one kernel below it
    ys = (rows + 0.5 - top) / max(k, 1)
    ramp_y = np.clip(ys, 0.0, 1.0)
    ramp_y = ramp_y * ramp_y * (3 - 2 * ramp_y)
    # taper to 0 at the sides and the bottom (over half a kernel)
    t = max(r, 1)
    xs = np.arange(w, dtype=np.float32)
    ramp_x = np.clip(np.minimum(xs, w - 1 - xs) / t, 0.0, 1.0)
    ramp_bottom = np.clip((h - 1 - rows) / t, 0.0, 1.0)
    mask *= (ramp_y * ramp_bottom)[:, None]
    mask *= ramp_x[None, :]
    mask[mask < 1.0 / 512] = 0.0  # below half a grey level: exactly unchanged
    return BoxMask.of(mask, shape=(h, w), row0=t0)


@cached(_MASKS, key=lambda *args: ("ellipse", *args), lock=_MASKS_LOCK, info=True)
def _ellipse_mask(h: int, w: int, upper_ratio: float, feather: float) -> BoxMask:
    # mouth and chin of a frontal face in a MuseTalk crop box: the box's middle row is about
    # the nose bridge, the chin close to the bottom
    canvas = np.zeros((h, w), np.uint8)
    center = (int(round(w * 0.5 * 16)), int(round(h * 0.70 * 16)))
    axes = (int(round(w * 0.36 * 16)), int(round(h * 0.26 * 16)))
    cv2.ellipse(canvas, center, axes, 0, 0, 360, 255, thickness=-1, lineType=cv2.LINE_AA, shift=4)
    return _feathered(canvas, h, w, upper_ratio, feather)


@cached(_MASKS, key=lambda *args: ("jaw", *args), lock=_MASKS_LOCK, info=True)
def _polygon_mask(h: int, w: int, poly: bytes, upper_ratio: float, feather: float) -> BoxMask:
    canvas = np.zeros((h, w), np.uint8)
    points = np.frombuffer(poly, dtype=np.int32).reshape(-1, 2)
    cv2.fillPoly(canvas, [points], 255, lineType=cv2.LINE_AA, shift=4)
    return _feathered(canvas, h, w, upper_ratio, feather)


def _jaw_polygon(lm: np.ndarray, top: float) -> bytes | None:
    """The jaw region in fillPoly's 1/16 px fixed point (the cache key), or None without landmarks."""
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        return None
    jaw = lm[2:15]
    y_close = max(top, float(lm[29, 1]))
    poly = np.concatenate([[[jaw[0, 0], y_close]], jaw, [[jaw[-1, 0], y_close]]])
    return np.rint(poly * 16).astype(np.int32).tobytes()


def box_mask(
    box_hw: tuple[int, int],
    landmarks_in_box: np.ndarray | None = None,
    *,
    upper_ratio: float = UPPER_RATIO,
    feather: float = FEATHER,
) -> BoxMask:
    """The cached :func:`lower_face_mask` with its non-zero rectangle (shared: read-only)."""
    h, w = int(box_hw[0]), int(box_hw[1])
    if h <= 0 or w <= 0:
        return BoxMask.of(np.zeros((max(h, 0), max(w, 0)), np.float32))
    poly = None
    if landmarks_in_box is not None:
        poly = _jaw_polygon(np.asarray(landmarks_in_box, dtype=np.float64), upper_ratio * h)
    if poly is None:
        return _ellipse_mask(h, w, float(upper_ratio), float(feather))
    return _polygon_mask(h, w, poly, float(upper_ratio), float(feather))


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
    Returns the caller's own (writable) array, built from the cached mask.
    """
    return box_mask(box_hw, landmarks_in_box, upper_ratio=upper_ratio, feather=feather).mask


def frame_mask(
    i: int,
    box,
    clipped: tuple[int, int, int, int],
    landmarks: np.ndarray | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    *,
    upper_ratio: float = UPPER_RATIO,
    feather: float = FEATHER,
) -> BoxMask:
    """Frame i's mask for its box ``clipped`` to the frame: the caller's ``masks[i]`` (of the
    clipped box, or of the whole box, then cut to the frame), else the cached lower-face mask."""
    x1, y1, x2, y2 = clipped
    h, w = y2 - y1, x2 - x1
    given = None if masks is None else masks[i]
    if given is None:
        lm = None
        if landmarks is not None:
            lm_i = np.asarray(landmarks[i], dtype=np.float64)
            if np.all(np.isfinite(lm_i)):
                lm = lm_i - np.array([x1, y1], dtype=np.float64)
        return box_mask((h, w), lm, upper_ratio=upper_ratio, feather=feather)
    mask = np.asarray(given, dtype=np.float32)
    if mask.shape != (h, w):
        bx1, by1, bx2, by2 = (int(c) for c in box)
        if mask.shape != (by2 - by1, bx2 - bx1):
            raise ValueError(f"mask {mask.shape} does not match box size {(h, w)}")
        mask = mask[y1 - by1 : y2 - by1, x1 - bx1 : x2 - bx1]
    if mask.size and not (mask.min() >= 0 and mask.max() <= 1):  # NaN fails too
        raise ValueError(f"mask {i} has values outside [0, 1]")
    return BoxMask.of(mask)


def blend_weights(weights: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray | None:
    """Validated per-frame cross-fade weights (float64 [n] in [0, 1]), or None."""
    if weights is None:
        return None
    scale = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(scale) != n:
        raise ValueError(f"{n} frames but {len(scale)} weights")
    if not np.all((scale >= 0) & (scale <= 1)):
        raise ValueError("blend weights must be in [0, 1]")
    return scale


def blend_faces(
    frames: np.ndarray | Sequence[np.ndarray],
    faces: np.ndarray | Sequence[np.ndarray],
    boxes: np.ndarray,
    landmarks: np.ndarray | None = None,
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    weights: Sequence[float] | np.ndarray | None = None,
    inplace: bool = False,
    upper_ratio: float = UPPER_RATIO,
    feather: float = FEATHER,
) -> np.ndarray | list[np.ndarray]:
    """Paste generated faces ``[B, s, s, 3]`` into frames ``[B, H, W, 3]`` at ``boxes`` ``[B, 4]``.

    * ``faces`` may also be a list of per-frame faces already at their (frame-clipped) box size
      (detail.restore_detail's output): those are pasted as they are.
    * ``landmarks``: ``[B, 68, 2]`` in frame pixels (NaN rows allowed) or None. Frames whose box row
      is invalid (-1: no face) are left as they are.
    * ``masks``: optional per-frame masks in box coordinates, float in [0, 1] (e.g. face-parsing
      masks, or :func:`lower_face_mask` from a per-video cache): the size of the box clipped to the
      frame, or of the whole box (then cut to the frame). A None entry gets the default mask.
    * ``weights``: optional ``[B]`` floats in [0, 1] that scale each frame's mask (cross-fades:
      1 = the generated face as masked, 0 = the source frame unchanged).
    * ``frames`` may also be a list of ``[H, W, 3]`` arrays, e.g. views of the face frames of a
      larger chunk: they are blended in place (``inplace=True`` is required) and no whole frame is
      copied.

    Returns a new array, or ``frames`` itself modified in place with ``inplace=True`` (cheaper:
    only the blended rectangles are written).
    """
    if isinstance(frames, np.ndarray):
        out = frames if inplace else frames.copy()
        H, W = out.shape[1:3]
    else:
        if not inplace:
            raise ValueError("a list of frames is blended in place: pass inplace=True")
        out = list(frames)
        H, W = (out[0].shape[:2]) if out else (0, 0)
    boxes = np.asarray(boxes).reshape(-1, 4)
    if not (len(out) == len(faces) == len(boxes)):
        raise ValueError(f"{len(out)} frames, {len(faces)} faces and {len(boxes)} boxes")
    if masks is not None and len(masks) != len(out):
        raise ValueError(f"{len(out)} frames but {len(masks)} masks")
    scale = blend_weights(weights, len(out))
    for i in range(len(out)):
        box = boxes[i]
        if not box_is_valid(box) or (scale is not None and scale[i] == 0):
            continue
        frame = out[i]
        if frame.shape[:2] != (H, W):
            raise ValueError(f"frame {i} is {frame.shape[:2]}, frame 0 is {(H, W)}")
        x1, y1, x2, y2 = clip_box(box, (H, W))
        if x2 <= x1 or y2 <= y1:
            continue
        bm = frame_mask(i, box, (x1, y1, x2, y2), landmarks, masks, upper_ratio=upper_ratio, feather=feather)
        if bm.empty:
            continue
        m = bm.weights(1.0 if scale is None else float(scale[i]))
        face = resize_to_box(np.asarray(faces[i]), (x1, y1, x2, y2))
        diff = face[bm.r0 : bm.r1, bm.c0 : bm.c1].astype(np.float32)
        region = frame[y1 + bm.r0 : y1 + bm.r1, x1 + bm.c0 : x1 + bm.c1]
        base = region.astype(np.float32)
        diff -= base
        diff *= m
        base += diff  # base + m * (face - base)
        base += 0.5
        np.copyto(region, base, casting="unsafe")  # truncation after +0.5: rounding; m == 0 -> unchanged
    return out
