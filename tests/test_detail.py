"""The detail-preserving paste (`sharpen`): what a 256x256 face loses in a large box comes back.

The "generated" face here is what a perfect MuseTalk would return: the source crop at 256x256,
with a changed mouth. Pasted plainly it is the soft upscale users see at 1080p; with `sharpen`
the source's own detail returns outside the mouth while the new mouth is kept.

Set LOOK_IMAGES_DIR to keep the before/after crops (docs/look.md shows them).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from lipsync_runner.render.blend import blend_faces
from lipsync_runner.render.sharpen import mouth_zone, restore_detail
from lipsync_runner.params import parse_fields
from lipsync_runner.media.samples import face_image, synthetic_landmarks
from lipsync_runner.errors import InvalidInputError

BOX = (384, 104, 896, 616)  # a 512x512 face box in a 720p frame: scale factor 2


@pytest.fixture(scope="module")
def scene() -> dict:
    photo = face_image()  # 512x512, real detail at this size
    frame = np.full((720, 1280, 3), 60, np.uint8)
    x1, y1, x2, y2 = BOX
    frame[y1:y2, x1:x2] = photo
    small = cv2.resize(photo, (256, 256), interpolation=cv2.INTER_AREA)
    face = small.copy()
    cv2.ellipse(face, (128, 200), (50, 22), 0, 0, 360, (40, 10, 20), -1)  # the new mouth
    zone = mouth_zone((512, 512), None) > 0.5
    return {"frame": frame, "face": face, "zone": zone}


def _paste(scene: dict, amount: float) -> np.ndarray:
    faces = scene["face"][None]
    if amount > 0:
        faces = restore_detail(scene["frame"][None], faces, np.array([BOX]), None, amount)
    mask = [np.ones((512, 512), np.float32)]  # the whole box: compare the faces themselves
    return blend_faces(scene["frame"][None], faces, np.array([BOX]), masks=mask)[0]


def _region(img: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = BOX
    return img[y1:y2, x1:x2].astype(np.float64)


def _high_band(img: np.ndarray) -> np.ndarray:
    return img - cv2.GaussianBlur(img, (0, 0), 1.2)


def test_sharpen_restores_the_sources_detail_outside_the_mouth_and_keeps_the_new_mouth(scene, tmp_path):
    source = _region(scene["frame"])
    plain, sharp = _region(_paste(scene, 0.0)), _region(_paste(scene, 1.0))
    outside, inside = ~scene["zone"], scene["zone"]

    err_plain = np.abs(plain - source)[outside].mean()
    err_sharp = np.abs(sharp - source)[outside].mean()
    assert err_sharp < 0.7 * err_plain, (err_plain, err_sharp)
    band_src, band_plain, band_sharp = (np.abs(_high_band(x))[outside].mean() for x in (source, plain, sharp))
    assert band_plain < 0.6 * band_src  # the soft look: the fine band is mostly gone ...
    assert band_sharp > 0.8 * band_src  # ... and back with sharpen
    # the generated mouth is not replaced by the source's: it keeps its difference from the source
    assert np.abs(sharp - source)[inside].mean() > 0.9 * np.abs(plain - source)[inside].mean()
    assert np.abs(_high_band(sharp))[inside].mean() > np.abs(_high_band(plain))[inside].mean()  # sharpened

    out = Path(os.environ.get("LOOK_IMAGES_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    crop = (slice(200, 456), slice(128, 384))  # cheek, mouth and chin at the output's own pixels
    for name, img in (("source", source), ("plain", plain), ("sharpen", sharp)):
        cv2.imwrite(str(out / f"detail_{name}.png"), cv2.cvtColor(img[crop].astype(np.uint8), cv2.COLOR_RGB2BGR))
    assert (out / "detail_sharpen.png").stat().st_size > 0


def test_sharpen_zero_and_small_boxes_paste_exactly_as_before(scene):
    box = np.array([BOX])
    faces = restore_detail(scene["frame"][None], scene["face"][None], box, None, 0.0)
    np.testing.assert_array_equal(blend_faces(scene["frame"][None], faces, box)[0],
                                  blend_faces(scene["frame"][None], scene["face"][None], box)[0])
    small_box = np.array([[100, 100, 300, 320]])  # narrower than 256: nothing was lost
    faces = restore_detail(scene["frame"][None], scene["face"][None], small_box, None, 1.0)
    np.testing.assert_array_equal(blend_faces(scene["frame"][None], faces, small_box)[0],
                                  blend_faces(scene["frame"][None], scene["face"][None], small_box)[0])


def test_mouth_zone_follows_the_lips_and_jaw_landmarks():
    lm = synthetic_landmarks(60, 440, 180, 480)
    lm[48:60] = np.column_stack([np.linspace(170, 330, 12), np.full(12, 380.0)])  # a wide mouth at y 380
    zone = mouth_zone((512, 512), lm)
    assert zone[380, 250] > 0.99 and zone[380, 175] > 0.9
    assert zone[120, 250] < 0.01  # the eyes and the upper face are left to the source's detail
    assert zone[380, 10] < 0.01


def test_sharpen_is_a_job_parameter_with_a_range():
    assert parse_fields({}).sharpen == 0.0  # off by default
    assert parse_fields({"sharpen": "0.5"}).sharpen == 0.5
    with pytest.raises(InvalidInputError, match="sharpen"):
        parse_fields({"sharpen": "2"})
