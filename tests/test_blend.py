"""Face crops (lipsync_runner.render.crops) and paste-back with a lower-face mask (lipsync_runner.render.blend)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lipsync_runner.render.blend import _ellipse_mask, blend_faces, lower_face_mask
from lipsync_runner.render.crops import CROP_SIZE, crop_faces
from lipsync_runner.media.samples import landmarks_for_boxes, synthetic_landmarks

from . import blend_reference as ref

H, W = 360, 640
BOX = (260, 80, 380, 240)  # x1, y1, x2, y2: 120 wide, 160 high




def frames_batch(b=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, H, W, 3), dtype=np.uint8)


def box_landmarks():
    """Landmarks matching BOX in frame pixels (v1.5 box: chin 10 px above the bottom)."""
    x1, y1, x2, y2 = BOX
    return synthetic_landmarks(x1, x2, y29=(y1 + y2 - 10) / 2, chin=y2 - 10)


# --------------------------------------------------------------------------- crops


def test_crop_faces_is_a_lanczos_resize_of_the_box_to_256():
    frames = frames_batch(3)
    boxes = np.array([BOX, BOX, [-1, -1, -1, -1]], dtype=np.int32)
    crops = crop_faces(frames, boxes)
    assert crops.shape == (3, CROP_SIZE, CROP_SIZE, 3) and crops.dtype == np.uint8
    x1, y1, x2, y2 = BOX
    expected = cv2.resize(frames[0, y1:y2, x1:x2], (256, 256), interpolation=cv2.INTER_LANCZOS4)
    np.testing.assert_array_equal(crops[0], expected)
    assert not crops[2].any()  # no-face row: a black crop


# --------------------------------------------------------------------------- mask


@pytest.mark.parametrize("with_landmarks", [False, True])
def test_mask_is_a_feathered_lower_face_mask(with_landmarks):
    x1, y1, x2, y2 = BOX
    h, w = y2 - y1, x2 - x1
    lm = box_landmarks() - [x1, y1] if with_landmarks else None
    m = lower_face_mask((h, w), lm)
    assert m.shape == (h, w) and m.dtype == np.float32
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert not m[: h // 2].any()  # upper half of the box: never blended
    assert not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()  # fades out at the border
    assert m[int(h * 0.72), w // 2] > 0.95  # the mouth is fully replaced
    soft = (m > 0) & (m < 1)
    assert soft.sum() > 0.05 * h * w  # a wide feathered band, not a hard edge


def test_mask_with_landmarks_follows_the_jaw():
    x1, y1, x2, y2 = BOX
    h, w = y2 - y1, x2 - x1
    lm = box_landmarks() - [x1, y1]
    m = lower_face_mask((h, w), lm)
    chin_x, chin_y = lm[8]
    assert m[int(chin_y) - 12, int(chin_x)] > 0.5  # above the chin: inside the jaw
    assert m[h - 12, 8] == 0  # lower corner, outside the jaw contour
    assert m[h - 12, w - 9] == 0


def test_mask_ignores_non_finite_landmarks():
    lm = np.full((68, 2), np.nan)
    np.testing.assert_array_equal(lower_face_mask((160, 120), lm), lower_face_mask((160, 120), None))


# --------------------------------------------------------------------------- blend


@pytest.mark.parametrize("with_landmarks", [False, True])
def test_blend_changes_only_the_masked_lower_face(with_landmarks):
    frames = frames_batch(2)
    original = frames.copy()
    faces = np.zeros((2, 256, 256, 3), np.uint8)
    faces[..., 1] = 255  # pure green: differs from every noise pixel somewhere
    boxes = np.array([BOX, BOX], dtype=np.int32)
    lms = np.stack([box_landmarks()] * 2) if with_landmarks else None

    out = blend_faces(frames, faces, boxes, lms)

    np.testing.assert_array_equal(frames, original)  # input untouched (not in place)
    assert out.shape == frames.shape and out.dtype == np.uint8
    x1, y1, x2, y2 = BOX
    lm_in_box = None if lms is None else lms[0] - [x1, y1]
    mask = lower_face_mask((y2 - y1, x2 - x1), lm_in_box)
    full = np.zeros((H, W), np.float32)
    full[y1:y2, x1:x2] = mask
    for i in range(2):
        np.testing.assert_array_equal(out[i][full == 0], original[i][full == 0])  # bit-identical
        inside = full > 0.99
        assert inside.sum() > 1000
        assert (out[i][inside][:, 1] >= 250).all()  # replaced by the generated face
        assert not np.array_equal(out[i][full > 0], original[i][full > 0])
    # nothing above the middle of the box and nothing outside it
    np.testing.assert_array_equal(out[:, : y1 + (y2 - y1) // 2], original[:, : y1 + (y2 - y1) // 2])
    np.testing.assert_array_equal(out[:, :, :x1], original[:, :, :x1])
    np.testing.assert_array_equal(out[:, y2:], original[:, y2:])


def test_blend_leaves_no_face_frames_alone_and_can_work_in_place():
    frames = frames_batch(2, seed=3)
    original = frames.copy()
    faces = np.full((2, 256, 256, 3), 200, np.uint8)
    boxes = np.array([[-1, -1, -1, -1], BOX], dtype=np.int32)
    out = blend_faces(frames, faces, boxes, None, inplace=True)
    assert out is frames
    np.testing.assert_array_equal(out[0], original[0])
    assert not np.array_equal(out[1], original[1])


def test_blend_accepts_precomputed_masks():
    frames = frames_batch(1, seed=4)
    faces = np.full((1, 256, 256, 3), 30, np.uint8)
    boxes = np.array([BOX], dtype=np.int32)
    x1, y1, x2, y2 = BOX
    mask = lower_face_mask((y2 - y1, x2 - x1))
    np.testing.assert_array_equal(
        blend_faces(frames, faces, boxes, masks=[mask]), blend_faces(frames, faces, boxes)
    )
    with pytest.raises(ValueError):
        blend_faces(frames, faces, boxes, masks=[mask[:-1]])
    for bad in (mask * 2, mask - 0.5, np.full_like(mask, np.nan)):
        with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
            blend_faces(frames, faces, boxes, masks=[bad])


def test_blend_of_the_unchanged_crop_is_nearly_lossless():
    # pasting back the frame's own crop (256 -> box size round trip) changes little
    rng = np.random.default_rng(5)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (31, 31), 0)
    frames = smooth[None]
    boxes = np.array([BOX], dtype=np.int32)
    out = blend_faces(frames, crop_faces(frames, boxes), boxes)
    assert np.abs(out.astype(int) - frames.astype(int)).max() <= 3


# --------------------------------------------------------------------------- pinned to the old code
# The per-frame cost work (issue 16) must not change a pixel: the crops, masks and blends below are
# compared with tests/blend_reference.py, the code as it was before, on a real face clip.


def test_crops_match_the_old_code_on_the_test_clip(face_clip):
    frames, boxes, _ = face_clip
    off_frame = boxes.copy()
    off_frame[off_frame[:, 0] >= 0] += [320, 200, 320, 200]  # partly right of and below the frame
    face = boxes[:, 0] >= 0
    assert (off_frame[face, 2] > frames.shape[2]).all() and (off_frame[face, 3] > frames.shape[1]).all()
    for b in (boxes, off_frame):
        np.testing.assert_array_equal(crop_faces(frames, b), ref.crop_faces(frames, b))
    np.testing.assert_array_equal(crop_faces(list(frames), boxes), ref.crop_faces(frames, boxes))


@pytest.mark.parametrize("case", ["ellipse", "landmarks", "off_frame"])
def test_blend_matches_the_old_code_on_the_test_clip(face_clip, case):
    frames, boxes, faces = face_clip
    lms = landmarks_for_boxes(boxes) if case == "landmarks" else None
    if case == "off_frame":
        boxes = boxes.copy()
        boxes[boxes[:, 0] >= 0] += [320, 200, 320, 200]  # partly outside
    expected = ref.blend_faces(frames, faces, boxes, lms)
    np.testing.assert_array_equal(blend_faces(frames, faces, boxes, lms), expected)
    np.testing.assert_array_equal(blend_faces(frames.copy(), faces, boxes, lms, inplace=True), expected)
    assert not np.array_equal(expected, frames)  # the case does blend something


def test_masks_match_the_old_code_for_every_size_and_kernel():
    rng = np.random.default_rng(1)
    for h, w in [(3, 3), (9, 7), (60, 40), (161, 120), (227, 167), (330, 246), (512, 380)]:
        for upper, feather in [(0.5, 0.08), (0.3, 0.15), (0.7, 0.03)]:
            np.testing.assert_array_equal(lower_face_mask((h, w), upper_ratio=upper, feather=feather),
                                          ref.lower_face_mask((h, w), upper_ratio=upper, feather=feather))
            lm = synthetic_landmarks(2, w - 2, y29=h * 0.45, chin=h - 3) + rng.normal(0, 0.5, (68, 2))
            np.testing.assert_array_equal(lower_face_mask((h, w), lm, upper_ratio=upper, feather=feather),
                                          ref.lower_face_mask((h, w), lm, upper_ratio=upper, feather=feather))


def test_masks_are_computed_once_per_box_size(face_clip):
    frames, boxes, faces = face_clip
    _ellipse_mask.cache_clear()
    blend_faces(frames, faces, boxes)
    sizes = {(int(y2 - y1), int(x2 - x1)) for x1, y1, x2, y2 in boxes if x1 >= 0}
    assert _ellipse_mask.cache_info().misses == len(sizes) < int((boxes[:, 0] >= 0).sum())
    blend_faces(frames, faces, boxes)
    assert _ellipse_mask.cache_info().misses == len(sizes)  # the second chunk reuses every mask
    m = lower_face_mask(next(iter(sizes)))
    m[:] = 0  # the caller's copy: the cached mask is not touched
    assert lower_face_mask(next(iter(sizes))).any()


def test_weights_scale_each_frames_mask(face_clip):
    frames, boxes, faces = face_clip
    sel = np.flatnonzero(boxes[:, 0] >= 0)[:3]
    f, fa, b = frames[sel], faces[sel], boxes[sel]
    full = blend_faces(f, fa, b)
    np.testing.assert_array_equal(blend_faces(f, fa, b, weights=[1, 1, 1]), full)
    out = blend_faces(f, fa, b, weights=[0.0, 0.5, 1.0])
    np.testing.assert_array_equal(out[0], f[0])  # 0: the source frame
    np.testing.assert_array_equal(out[2], full[2])  # 1: the generated face as masked
    x1, y1, x2, y2 = b[1]
    half = lower_face_mask((y2 - y1, x2 - x1)) * np.float32(0.5)
    np.testing.assert_array_equal(out[1], ref.blend_faces(f[1:2], fa[1:2], b[1:2], masks=[half])[0])
    assert 0 < np.abs(out[1].astype(int) - f[1]).max() < np.abs(full[1].astype(int) - f[1]).max()
    for bad in ([0.5, 1.5, 1.0], [-0.1, 1, 1], [1, 1]):
        with pytest.raises(ValueError):
            blend_faces(f, fa, b, weights=bad)


def test_a_list_of_frame_views_is_blended_in_place_without_copying_frames(face_clip):
    frames, boxes, faces = face_clip
    chunk = frames[:10].copy()
    sel = np.flatnonzero(boxes[:10, 0] >= 0)
    views = [chunk[i] for i in sel]
    assert blend_faces(views, faces[sel], boxes[sel], inplace=True)[0] is views[0]
    expected = frames[:10].copy()
    expected[sel] = ref.blend_faces(frames[sel], faces[sel], boxes[sel])
    np.testing.assert_array_equal(chunk, expected)
    with pytest.raises(ValueError, match="in place"):
        blend_faces(views, faces[sel], boxes[sel])


def test_a_mask_of_the_whole_box_is_cut_to_the_frame():
    frames = frames_batch(1, seed=6)
    faces = np.full((1, 256, 256, 3), 10, np.uint8)
    box = np.array([[W - 100, 100, W + 20, 260]])  # 20 px past the right edge
    whole = np.ones((160, 120), np.float32)
    out = blend_faces(frames, faces, box, masks=[whole])
    np.testing.assert_array_equal(out, blend_faces(frames, faces, box, masks=[whole[:, :100]]))
    assert (out[0, 100:260, W - 100 :] == 10).all()
