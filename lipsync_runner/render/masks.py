"""Blend masks as MuseTalk makes them: v1.5's face-parsing ``jaw`` mode, else from landmarks.

A mask provider turns source frames, their crop boxes and landmarks into one float32 mask per
frame in box coordinates (``[y2 - y1, x2 - x1]``, values in [0, 1]) for
``blend.blend_faces(..., masks=...)``. Masks depend only on the source frame and its box, so
they can be computed once per video (MuseTalk's real-time mode caches them the same way).

MuseTalk's geometry (``musetalk/utils/blending.py`` ``get_image``, v1.5 ``scripts/inference.py``),
for a face box ``x, y, x1, y1`` (v1.5: ``y1`` already includes ``extra_margin``):

1. the expanded square crop: centre ``((x + x1) // 2, (y + y1) // 2)``, half side
   ``s = int(max(w, h) // 2 * 1.5)``; outside the frame it is black;
2. the crop is resized to 512x512 (PIL bilinear) and parsed into 19 classes (BiSeNet);
3. class selection, mode ``jaw`` (v1.5): the skin (1) is dilated with MuseTalk's 33x33 cone
   kernel (the region grows up to 16 px upward and 6 px downward); on the outer cheeks
   (columns <= 256 - 90 and >= 256 + 90) it is then eroded twice with a 35x3 ellipse; every
   selected pixel that is not nose (10) is kept, and mouth (11) and lips (12, 13) are added.
   Mode ``raw`` (v1.0): skin, mouth and lips;
4. the 0/255 selection is resized to the crop (PIL bicubic), cut to the face box, and everything
   above the crop's middle row (``upper_boundary_ratio`` 0.5: the box's centre row) is cleared;
5. Gaussian blur of kernel ``int(0.05 * 2s // 2 * 2) + 1`` over the whole crop, so the mask fades
   out towards the box's borders.

Without the parsing weights, :class:`ContourMasks` does steps 1, 4 and 5 on a region drawn from
iBUG-68 landmarks (MediaPipe's face mesh or FAN): the jaw contour with the cheeks pulled in,
closed at the nose bridge, minus the nose, plus the lips. Frames without landmarks get None
(blend.py's own mask is used there).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from lipsync_runner.render.crops import box_is_valid, clip_box

#: MuseTalk's get_image defaults.
UPPER_BOUNDARY_RATIO = 0.5
EXPAND = 1.5
BLUR_FRACTION = 0.05
#: MuseTalk v1.5 passes --left_cheek_width / --right_cheek_width 90 (FaceParsing's default: 80).
CHEEK_WIDTH = {"v15": 90, "v1": 80}
PARSE_SIZE = 512

SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK = 1, 10, 11, 12, 13, 14


class MaskProvider(Protocol):
    name: str

    def __call__(self, frames: np.ndarray, boxes: np.ndarray,
                 landmarks: np.ndarray | None = None) -> list[np.ndarray | None]:
        """One float32 mask per frame in (frame-clipped) box coordinates, or None for a row to
        leave to blend.py's default mask (no box, or nothing to build the mask from)."""
        ...


# --------------------------------------------------------------------------- class selection


def cone_kernel() -> np.ndarray:
    """MuseTalk's 33x33 ``jaw`` dilation kernel: a cone (rows 10-20, widths 1..21) on a column."""
    cone, tail = 21, 12
    size = cone + tail
    kernel = np.zeros((size, size), np.uint8)
    c = size // 2
    for row in range(cone // 2, cone):
        half = row - cone // 2  # width 2 * half + 1
        kernel[row, c - half : c + half + 1] = 1
    base = int(kernel[cone - 1].sum())
    kernel[cone:, max(0, c - base // 2) : min(size, c + base // 2 + 1)] = 1
    return kernel


def cheek_mask(left: int, right: int, size: int = PARSE_SIZE) -> np.ndarray:
    """255 on the outer cheek columns (``x <= size/2 - left`` and ``x >= size/2 + right``)."""
    mask = np.zeros((size, size), np.uint8)
    centre = size // 2
    mask[:, : centre - left + 1] = 255
    mask[:, centre + right :] = 255
    return mask


_CHEEK_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))


def select_classes(parsing: np.ndarray, mode: str = "jaw", cheek_width: int = CHEEK_WIDTH["v15"]) -> np.ndarray:
    """A ``[512, 512]`` class map -> uint8 0/255 selection, MuseTalk's FaceParsing modes."""
    parsing = np.asarray(parsing)
    if mode == "jaw":
        skin = np.where(parsing == SKIN, 255, 0).astype(np.uint8)
        dilated = cv2.dilate(skin, cone_kernel(), iterations=1)
        eroded = cv2.erode(dilated, _CHEEK_KERNEL, iterations=2)
        cheeks = cheek_mask(cheek_width, cheek_width, parsing.shape[0])
        region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, cv2.bitwise_not(cheeks)))
        keep = ((region == 255) & (parsing != NOSE)) | np.isin(parsing, (MOUTH, UPPER_LIP, LOWER_LIP))
    elif mode == "raw":
        keep = np.isin(parsing, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP))
    elif mode == "neck":
        keep = np.isin(parsing, (SKIN, MOUTH, UPPER_LIP, LOWER_LIP, NECK))
    else:
        raise ValueError(f"unknown parsing mode {mode!r} (expected 'jaw', 'raw' or 'neck')")
    return np.where(keep, 255, 0).astype(np.uint8)


# --------------------------------------------------------------------------- geometry


def expanded_crop_box(box, expand: float = EXPAND) -> tuple[int, int, int, int]:
    """MuseTalk's get_crop_box: the square crop it parses, ``(x_s, y_s, x_e, y_e)`` (may leave the frame)."""
    x, y, x1, y1 = (int(c) for c in box)
    xc, yc = (x + x1) // 2, (y + y1) // 2
    s = int(max(x1 - x, y1 - y) // 2 * expand)
    return xc - s, yc - s, xc + s, yc + s


def parsing_input(frame: np.ndarray, crop_box: tuple[int, int, int, int]) -> np.ndarray:
    """The expanded crop (black outside the frame) resized to 512x512 as MuseTalk does (PIL bilinear)."""
    from PIL import Image

    crop = Image.fromarray(np.ascontiguousarray(frame)).crop(crop_box)
    return np.asarray(crop.resize((PARSE_SIZE, PARSE_SIZE), Image.Resampling.BILINEAR))


def box_mask(selection: np.ndarray, box, crop_box: tuple[int, int, int, int], *,
             upper_boundary_ratio: float = UPPER_BOUNDARY_RATIO, blur_fraction: float = BLUR_FRACTION,
             selection_in_crop: bool = False) -> np.ndarray:
    """Steps 4-5: a 0/255 selection (512x512 parse space, or already crop-sized with
    ``selection_in_crop``) -> float32 mask in [0, 1] of the face box's size."""
    from PIL import Image

    x, y, x1, y1 = (int(c) for c in box)
    xs, ys, xe, ye = crop_box
    side = xe - xs
    sel = np.asarray(selection, np.uint8)
    if not selection_in_crop:
        sel = np.asarray(Image.fromarray(sel).resize((side, side), Image.Resampling.BICUBIC))
    canvas = np.zeros((side, side), np.uint8)
    canvas[y - ys : y1 - ys, x - xs : x1 - xs] = sel[y - ys : y1 - ys, x - xs : x1 - xs]
    canvas[: int(side * upper_boundary_ratio)] = 0
    k = int(blur_fraction * side // 2 * 2) + 1
    canvas = cv2.GaussianBlur(canvas, (k, k), 0)
    return canvas[y - ys : y1 - ys, x - xs : x1 - xs].astype(np.float32) * (1.0 / 255.0)


def _frame_box(box, frame_hw) -> tuple[int, int, int, int] | None:
    if not box_is_valid(box):
        return None
    x, y, x1, y1 = clip_box(box, frame_hw)
    return (x, y, x1, y1) if x1 > x and y1 > y else None


# --------------------------------------------------------------------------- providers


class ParsingMasks:
    """MuseTalk's face-parsing blend masks (``jaw`` for v1.5, ``raw`` for v1.0)."""

    name = "parsing"

    def __init__(self, parser, *, version: str = "v15", batch_size: int = 8) -> None:
        self.parser = parser
        self.mode = "jaw" if version == "v15" else "raw"
        self.cheek_width = CHEEK_WIDTH.get(version, CHEEK_WIDTH["v15"])
        self.batch_size = max(1, int(batch_size))
        self._lock = threading.Lock()

    def __call__(self, frames: np.ndarray, boxes: np.ndarray,
                 landmarks: np.ndarray | None = None) -> list[np.ndarray | None]:
        frames = np.asarray(frames)
        out: list[np.ndarray | None] = [None] * len(frames)
        todo = [(i, b) for i, b in enumerate(_frame_box(b, frames.shape[1:3]) for b in np.asarray(boxes).reshape(-1, 4))
                if b is not None]
        for start in range(0, len(todo), self.batch_size):
            part = todo[start : start + self.batch_size]
            crops = [expanded_crop_box(b) for _, b in part]
            inputs = np.stack([parsing_input(frames[i], c) for (i, _), c in zip(part, crops)])
            with self._lock:
                parsings = self.parser.parse(inputs)
            for (i, b), c, parsing in zip(part, crops, parsings):
                out[i] = box_mask(select_classes(parsing, self.mode, self.cheek_width), b, c)
        return out


class ContourMasks:
    """MuseTalk's mask geometry over a landmark region (no parsing network needed)."""

    name = "contour"

    #: Jaw points 0 and 16 sit at ear level on the face's edge: pull the sides in (MuseTalk erodes
    #: the outer cheeks) by this fraction of the jaw width.
    CHEEK_INSET = 0.06

    def __call__(self, frames: np.ndarray, boxes: np.ndarray,
                 landmarks: np.ndarray | None = None) -> list[np.ndarray | None]:
        frames = np.asarray(frames)
        out: list[np.ndarray | None] = [None] * len(frames)
        if landmarks is None:
            return out
        for i, box in enumerate(np.asarray(boxes).reshape(-1, 4)):
            b = _frame_box(box, frames.shape[1:3])
            lm = np.asarray(landmarks[i], np.float64)
            if b is None or lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
                continue
            crop = expanded_crop_box(b)
            out[i] = box_mask(contour_selection(lm, crop, self.CHEEK_INSET), b, crop, selection_in_crop=True)
        return out


def contour_selection(landmarks: np.ndarray, crop_box: tuple[int, int, int, int],
                      cheek_inset: float = ContourMasks.CHEEK_INSET) -> np.ndarray:
    """0/255 region in crop coordinates: jaw contour (sides pulled in) closed at the nose
    bridge, minus the nose below the bridge, plus the outer lips."""
    xs, ys, xe, ye = crop_box
    lm = np.asarray(landmarks, np.float64) - np.array([xs, ys])
    jaw = lm[:17].copy()
    cx = (jaw[0, 0] + jaw[16, 0]) / 2
    jaw[:, 0] = cx + (jaw[:, 0] - cx) * (1 - 2 * cheek_inset)
    top = min(jaw[0, 1], jaw[16, 1], lm[28, 1])
    poly = np.concatenate([[[jaw[0, 0], top]], jaw, [[jaw[16, 0], top]]])
    canvas = np.zeros((ye - ys, xe - xs), np.uint8)
    fill = lambda pts, v: cv2.fillPoly(canvas, [np.rint(pts * 16).astype(np.int32)], v,  # noqa: E731
                                       lineType=cv2.LINE_8, shift=4)
    fill(poly, 255)
    nose = np.concatenate([lm[[28]], lm[31:36], lm[[28]]])  # bridge point, nostrils left to right
    fill(nose, 0)
    fill(lm[48:60], 255)
    return canvas


def load_mask_provider(models_dir: Path | str | None, *, version: str = "v15", device: str = "cpu") -> MaskProvider:
    """Face parsing when its two files are in ``models_dir/face-parse-bisent/``, else landmark contours."""
    from lipsync_runner.models.face_parsing import FaceParser, parsing_weights_present

    if parsing_weights_present(models_dir):
        return ParsingMasks(FaceParser.from_pretrained(models_dir, device=device), version=version)
    return ContourMasks()


def masks_for(provider: MaskProvider | None, frames: np.ndarray, boxes: np.ndarray,
              landmarks: np.ndarray | None) -> Sequence[np.ndarray | None] | None:
    """The provider's masks, or None without a provider (blend.py's default mask then)."""
    return None if provider is None else provider(frames, boxes, landmarks)
