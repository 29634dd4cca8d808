"""MuseTalk's crop-box rule: one crop box per detected face (landmarks or a Haar box)."""

from __future__ import annotations

import numpy as np

from lipsync_runner.faces.detectors.base import FaceDetection

# Where a frontal face's landmarks fall relative to a Haar box, as fractions of the box size
# (measured on frontal faces with OpenCV's frontalface cascades: the box runs from the forehead to
# about the lower lip). Used to synthesise MuseTalk's landmark box when no landmarks are known.
HAAR_SIDE_INSET = 0.04  # jaw contour x extent: box sides moved in by 4 % of the width
HAAR_NOSE_BRIDGE_Y = 0.55  # landmark 29 (nose bridge) at 55 % of the box height
HAAR_CHIN_Y = 1.15  # lowest landmark (chin, 8) at 115 % of the box height, below the box


# --------------------------------------------------------------------------- crop-box rule


def _normalise_version(version: str) -> str:
    v = str(version).lower().lstrip("v").replace(".", "")
    if v == "15":
        return "v15"
    if v in ("1", "10"):
        return "v1"
    raise ValueError(f"unknown MuseTalk version {version!r} (expected 'v15' or 'v1')")


def musetalk_crop_box(
    det: FaceDetection,
    frame_hw: tuple[int, int],
    *,
    bbox_shift: int = 0,
    version: str = "v15",
    extra_margin: int = 10,
) -> tuple[int, int, int, int]:
    """MuseTalk's crop box ``(x1, y1, x2, y2)`` (ints, end-exclusive, inside the frame).

    With landmarks (cast to int32 as MuseTalk does): x1/x2 = min/max landmark x; the mid line is
    landmark 29's y plus ``bbox_shift`` (v1 only: v1.5 forces bbox_shift to 0); y2 = max landmark
    y; y1 = max(0, mid - (y2 - mid)). If that box is invalid (y2 <= y1, x2 <= x1 or x1 < 0) the
    detector box is used instead.

    Without landmarks (Haar) the same rule runs on landmark positions synthesised from the
    detector box of a frontal face (box x1, y1, width w, height h): jaw x extent = box sides moved
    in by 4 % of w, landmark 29 at y1 + 0.55 h, chin at y1 + 1.15 h. A Haar box runs from the
    forehead to about the lower lip, so this crop reaches below the chin; its top is y1 - 0.05 h
    (the mid line splits the crop in half, as with landmarks).

    v1.5 then moves y2 down by ``extra_margin`` px, capped at the frame height. Finally the box is
    clamped to the frame (and kept at least 1 px wide and tall).
    """
    h_frame, w_frame = int(frame_hw[0]), int(frame_hw[1])
    v = _normalise_version(version)
    shift = int(bbox_shift) if v == "v1" else 0

    box = np.asarray(det.box, dtype=np.float64).reshape(4)
    if det.landmarks is not None and np.all(np.isfinite(det.landmarks)):
        lm = np.asarray(det.landmarks).astype(np.int32)
        min_x, max_x = int(lm[:, 0].min()), int(lm[:, 0].max())
        mid = int(lm[29, 1])
        max_y = int(lm[:, 1].max())
    else:
        bw, bh = box[2] - box[0], box[3] - box[1]
        min_x = int(round(box[0] + HAAR_SIDE_INSET * bw))
        max_x = int(round(box[2] - HAAR_SIDE_INSET * bw))
        mid = int(round(box[1] + HAAR_NOSE_BRIDGE_Y * bh))
        max_y = int(round(box[1] + HAAR_CHIN_Y * bh))
    mid += shift
    half = max_y - mid
    x1, y1, x2, y2 = min_x, max(0, mid - half), max_x, max_y
    if y2 - y1 <= 0 or x2 - x1 <= 0 or x1 < 0:
        x1, y1, x2, y2 = (int(round(c)) for c in box)
    if v == "v15":
        y2 = min(y2 + int(extra_margin), h_frame)
    return clamp_box((x1, y1, x2, y2), (h_frame, w_frame))


def clamp_box(box, frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box as ints inside the frame, at least 1 px wide and tall."""
    h, w = frame_hw
    x1, y1, x2, y2 = (int(c) for c in box)
    x1 = min(max(x1, 0), w - 1)
    y1 = min(max(y1, 0), h - 1)
    x2 = min(max(x2, x1 + 1), w)
    y2 = min(max(y2, y1 + 1), h)
    return x1, y1, x2, y2
