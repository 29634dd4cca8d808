"""Torch crop/resize and blend (lipsync_runner.render.torch_ops): the numpy path's results within 1 of 255.

Run on torch CPU tensors (and on CUDA too where a GPU is present): the ops are the same code on
either device.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from lipsync_runner.render import blend, crops, torch_ops as gpu_ops
from lipsync_runner.media.samples import landmarks_for_boxes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def clip4(face_clip):
    """4 frames of the face clip, one without a face (here frame 2): dense matmuls on a CPU are
    slow, and these cover every case."""
    frames, boxes, faces = face_clip
    assert (boxes[6:10, 0] < 0).sum() >= 1 and (boxes[6:10, 0] >= 0).sum() >= 2
    return frames[6:10], boxes[6:10], faces[6:10]


def _max_diff(a, b) -> int:
    a = a.cpu().numpy() if isinstance(a, torch.Tensor) else a
    return int(np.abs(a.astype(int) - np.asarray(b).astype(int)).max())


@pytest.mark.parametrize("device", DEVICES)
def test_crops_are_opencvs_lanczos_bit_for_bit_in_float64_and_within_1_in_float32(clip4, device):
    frames, boxes, _ = clip4
    expected = crops.crop_faces(frames, boxes)
    exact = gpu_ops.crop_faces(frames, boxes, device=device, dtype=torch.float64)
    assert exact.device.type == device and exact.dtype == torch.uint8
    np.testing.assert_array_equal(exact.cpu().numpy(), expected)
    assert _max_diff(gpu_ops.crop_faces(torch.from_numpy(frames).to(device), boxes), expected) <= 1
    # odd sizes, boxes past the frame's edges, shrinking and enlarging
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (4, 360, 400, 3), dtype=np.uint8)
    odd = np.array([[0, 0, 7, 5], [350, 300, 500, 420], [10, 20, 330, 350], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(gpu_ops.crop_faces(big, odd, device=device, dtype=torch.float64).cpu().numpy(),
                                  crops.crop_faces(big, odd))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["ellipse", "landmarks", "weights", "enlarged", "masks"])
def test_blend_matches_the_numpy_path_within_1(clip4, device, case):
    frames, boxes, faces = clip4
    kwargs: dict = {}
    if case == "landmarks":
        kwargs["landmarks"] = landmarks_for_boxes(boxes)
    if case == "weights":
        kwargs["weights"] = np.linspace(0, 1, len(frames))
    if case == "enlarged":  # boxes larger than 256: the bilinear branch of the face resize
        boxes = boxes.copy()
        boxes[boxes[:, 0] >= 0] = [150, 20, 450, 350]
    if case == "masks":  # e.g. face-parsing masks: any shape of [0, 1] values per box
        rng = np.random.default_rng(4)
        kwargs["masks"] = [None if x1 < 0 else cv2.GaussianBlur(rng.random((y2 - y1, x2 - x1), np.float32), (9, 9), 0)
                           for x1, y1, x2, y2 in boxes]
    expected = blend.blend_faces(frames, faces, boxes, **kwargs)
    out = gpu_ops.blend_faces(torch.from_numpy(frames).to(device), torch.from_numpy(faces).to(device), boxes,
                              **kwargs)
    assert out.device.type == device and out.dtype == torch.uint8
    assert _max_diff(out, expected) <= 1
    changed = np.abs(out.cpu().numpy().astype(int) - frames).max(axis=-1) > 0
    assert changed.any()
    # nothing outside the pixels the numpy path may touch changes
    touched = np.abs(expected.astype(int) - frames).max(axis=-1) > 0
    may_touch = np.zeros_like(touched)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        if x1 >= 0:
            may_touch[i, y1:y2, x1:x2] = True
    assert not (changed & ~may_touch).any() and not (touched & ~may_touch).any()


def test_blend_in_place_writes_into_the_given_tensor_and_leaves_no_face_frames_alone(clip4):
    frames, boxes, faces = clip4
    t = torch.from_numpy(frames.copy())
    out = gpu_ops.blend_faces(t, faces, boxes, inplace=True)
    assert out is t
    np.testing.assert_array_equal(t[2].numpy(), frames[2])  # no face in this frame
    assert _max_diff(t, blend.blend_faces(frames, faces, boxes)) <= 1
    with pytest.raises(ValueError, match="inplace"):
        gpu_ops.blend_faces(frames, faces, boxes, inplace=True)  # a numpy array cannot be changed in place
    with pytest.raises(ValueError):
        gpu_ops.blend_faces(t, faces, boxes, weights=np.full(len(frames), 2.0))


def test_resize_matrices_are_normalised_filters():
    for src, dst, kind in [(160, 256, "lanczos4"), (600, 256, "lanczos4"), (256, 160, "area"),
                           (256, 300, "linear"), (256, 77, "area")]:
        m = gpu_ops.resize_matrix(src, dst, kind)
        assert m.shape == (dst, src)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=4 / 2048)  # 11-bit coefficients
    with pytest.raises(ValueError):
        gpu_ops.resize_matrix(10, 5, "bicubic")
