"""Face crop/resize and blend as torch ops, to run on the model's device beside the model.

The same operations as :func:`lipsync_runner.render.crops.crop_faces` and
:func:`lipsync_runner.render.blend.blend_faces`, with the same results within 1 of 255:

* every OpenCV resize is written as two resampling matrices, ``out = Wy @ image @ Wx^T``, built
  the way OpenCV builds its filters: Lanczos-4 (8 taps, 11-bit fixed-point coefficients, edge
  pixels repeated) for the 256x256 crop, exact area coverage when a generated face is shrunk into
  its box, bilinear with 11-bit coefficients when it is enlarged. The Lanczos crop matches OpenCV
  bit for bit in float64 and within 1 (rare rounding ties) in float32; the area and bilinear
  resizes differ by at most 1 where OpenCV's vector code rounds differently;
* a batch with boxes of different sizes becomes one batched matmul: each box is padded to the
  largest in the batch, and the padding has zero weight;
* blend masks are the CPU module's (the same LRU-cached arrays), sent to the device once per
  batch; the blend arithmetic is the same float32 expression, and only each mask's non-zero
  rectangle of each frame is written.

Frames and faces are uint8 tensors ``[B, H, W, 3]`` (numpy arrays are accepted and moved to
``device``); boxes, landmarks, masks and weights are small and stay numpy. Nothing here needs
CUDA: on a machine without a GPU the same code runs on torch's CPU tensors (that is how the tests
hold it to the numpy path).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import threading

import numpy as np
import torch
from cachetools import LRUCache, cached

from lipsync_runner.render.blend import FEATHER, UPPER_RATIO, BoxMask, blend_weights, frame_mask
from lipsync_runner.render.crops import CROP_SIZE, box_is_valid, clip_box

_COEF_SCALE = 2048.0  # OpenCV's INTER_RESIZE_COEF_SCALE: 11-bit fixed-point filter coefficients
_S45 = 0.70710678118654752440084436210485
_LANCZOS_CS = ((1, 0), (-_S45, -_S45), (0, 1), (_S45, -_S45), (-1, 0), (_S45, _S45), (0, -1), (-_S45, _S45))


def _lanczos4_coeffs(x: np.ndarray) -> np.ndarray:
    """OpenCV's 8 Lanczos-4 coefficients ``float32 [n, 8]`` for fractional offsets ``x`` ``float32 [n]``,
    with OpenCV's float32 roundings (interpolateLanczos4 in imgproc/src/resize.cpp)."""
    x3 = (x + np.float32(3)).astype(np.float32)
    y0 = -x3.astype(np.float64) * math.pi * 0.25
    s0, c0 = np.sin(y0)[:, None], np.cos(y0)[:, None]
    taps = np.arange(8)
    yi = (x3[:, None] - taps.astype(np.float32)[None, :]).astype(np.float32)
    y = -yi.astype(np.float64) * math.pi * 0.25
    cs = np.array(_LANCZOS_CS)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = ((cs[:, 0] * s0 + cs[:, 1] * c0) / (y * y)).astype(np.float32)
    c = np.where(np.abs(yi) >= np.float32(1e-6), c, np.float32(1e30))  # OpenCV: this tap 1, the others 0
    total = np.zeros(len(x), np.float32)
    for k in taps:  # OpenCV sums in order, in float32
        total = (total + c[:, k]).astype(np.float32)
    return (c * (np.float32(1) / total)[:, None]).astype(np.float32)


def _source_positions(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer source index and float32 fraction of each output sample, as OpenCV's resize computes them."""
    scale = 1.0 / (dst / src)  # OpenCV: scale_x = 1. / inv_scale_x
    fx = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    return sx, (fx - sx.astype(np.float32)).astype(np.float32)


#: Bytes of resampling matrices kept (one per source size, target size and filter in use).
MATRIX_CACHE_BYTES = 64 * 2**20
_MATRICES: LRUCache = LRUCache(maxsize=MATRIX_CACHE_BYTES, getsizeof=lambda m: m.nbytes)


@cached(_MATRICES, lock=threading.Lock())
def resize_matrix(src: int, dst: int, kind: str) -> np.ndarray:
    """float32 ``[dst, src]`` weights of OpenCV's 1-D resize of ``src`` samples to ``dst``.

    ``kind``: ``lanczos4`` (INTER_LANCZOS4), ``linear`` (INTER_LINEAR) or ``area`` (INTER_AREA,
    used to shrink). The fixed-point filters' weights (multiples of 1/2048) are exact in float32.
    Read-only (shared).
    """
    if src <= 0 or dst <= 0:
        raise ValueError(f"cannot resize {src} samples to {dst}")
    m = np.zeros((dst, src), np.float64)
    rows = np.arange(dst)
    if kind == "lanczos4":
        sx, fx = _source_positions(src, dst)
        fixed = np.rint(_lanczos4_coeffs(fx) * np.float32(_COEF_SCALE))
        for k in range(8):  # taps beyond the edge repeat the edge sample
            np.add.at(m, (rows, np.clip(sx - 3 + k, 0, src - 1)), fixed[:, k])
        m /= _COEF_SCALE
    elif kind == "linear":
        sx, fx = _source_positions(src, dst)
        edge = (sx < 0) | (sx >= src - 1)
        fx = np.where(edge, np.float32(0), fx).astype(np.float32)
        sx = np.clip(sx, 0, src - 1)
        np.add.at(m, (rows, sx), np.rint((np.float32(1) - fx) * np.float32(_COEF_SCALE)))
        np.add.at(m, (rows, np.minimum(sx + 1, src - 1)), np.rint(fx * np.float32(_COEF_SCALE)))
        m /= _COEF_SCALE
    elif kind == "area":
        scale = src / dst
        lo, hi = rows[:, None] * scale, (rows[:, None] + 1) * scale
        cells = np.arange(src)[None, :]
        m = np.clip(np.minimum(hi, cells + 1) - np.maximum(lo, cells), 0.0, None)
        m /= m.sum(axis=1, keepdims=True)
    else:
        raise ValueError(f"unknown resize kind {kind!r} (lanczos4, linear, area)")
    m = m.astype(np.float32)
    m.setflags(write=False)
    return m


def _as_tensor(x, device: torch.device | str | None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t if device is None else t.to(device)


def _resize_batch(images: list[torch.Tensor], windows: list[tuple[int, int, int, int, int, int]], kinds: list[str],
                  dtype: torch.dtype) -> torch.Tensor:
    """Resize images ``[h_i, w_i, C]`` in one batched pair of matmuls.

    ``windows[i]`` = (out_h, out_w, r0, r1, c0, c1): the image is resized to out_h x out_w and only
    rows r0:r1, cols c0:c1 of the result are computed (each output pixel depends only on its own
    row and column of the matrices, so this equals cutting the full resize). Returns float
    ``[B, max rows, max cols, C]`` before rounding, zero past each image's own window.
    """
    dev = images[0].device
    hin = max(im.shape[0] for im in images)
    win = max(im.shape[1] for im in images)
    hout = max(w[3] - w[2] for w in windows)
    wout = max(w[5] - w[4] for w in windows)
    b, c = len(images), images[0].shape[2]
    x = torch.zeros((b, hin, win, c), dtype=dtype, device=dev)
    wy = np.zeros((b, hout, hin))
    wx = np.zeros((b, wout, win))
    for i, (im, (oh, ow, r0, r1, c0, c1), kind) in enumerate(zip(images, windows, kinds)):
        h, w = im.shape[:2]
        x[i, :h, :w] = im
        wy[i, : r1 - r0, :h] = resize_matrix(h, oh, kind)[r0:r1]
        wx[i, : c1 - c0, :w] = resize_matrix(w, ow, kind)[c0:c1]
    wy_t = torch.from_numpy(wy).to(dev, dtype)
    wx_t = torch.from_numpy(wx).to(dev, dtype)
    # The cheaper order of the two passes (the same sums either way)
    if hin * win * wout + hout * hin * wout <= hout * hin * win + hout * win * wout:
        return torch.einsum("bph,bhoc->bpoc", wy_t, torch.einsum("bow,bhwc->bhoc", wx_t, x))
    return torch.einsum("bow,bpwc->bpoc", wx_t, torch.einsum("bph,bhwc->bpwc", wy_t, x))


def _to_uint8(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(v + 0.5).clamp_(0, 255).to(torch.uint8)


def crop_faces(frames, boxes: np.ndarray, size: int = CROP_SIZE, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Face crops ``uint8 [B, size, size, 3]`` on the frames' device: the Lanczos resize of each
    clipped box, zeros for no-face (-1) rows, as :func:`lipsync_runner.render.crops.crop_faces`.

    ``dtype=torch.float64`` makes the result bit-identical to OpenCV's (float32: within 1).
    """
    x = _as_tensor(frames, device)
    boxes = np.asarray(boxes).reshape(-1, 4)
    if len(x) != len(boxes):
        raise ValueError(f"{len(x)} frames but {len(boxes)} boxes")
    out = torch.zeros((len(x), size, size, x.shape[-1]), dtype=torch.uint8, device=x.device)
    rows, regions = [], []
    for i, box in enumerate(boxes):
        if not box_is_valid(box):
            continue
        x1, y1, x2, y2 = clip_box(box, tuple(x.shape[1:3]))
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"empty crop box {tuple(int(c) for c in box)} for a frame of {tuple(x.shape[1:3])}")
        rows.append(i)
        regions.append(x[i, y1:y2, x1:x2])
    if rows:
        resized = _resize_batch(regions, [(size, size, 0, size, 0, size)] * len(rows), ["lanczos4"] * len(rows), dtype)
        out[rows] = _to_uint8(resized)
    return out


def _face_resize_kind(face_hw: tuple[int, int], box_hw: tuple[int, int]) -> str | None:
    """As crops.resize_to_box: None (same size), area when shrinking both ways, else bilinear."""
    (fh, fw), (h, w) = face_hw, box_hw
    if (fh, fw) == (h, w):
        return None
    return "area" if (w < fw and h < fh) else "linear"


def blend_faces(frames, faces, boxes: np.ndarray, landmarks: np.ndarray | None = None, *,
                masks: Sequence[np.ndarray | None] | None = None,
                weights: Sequence[float] | np.ndarray | None = None, inplace: bool = False,
                upper_ratio: float = UPPER_RATIO, feather: float = FEATHER,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Paste generated faces ``uint8 [B, s, s, 3]`` into frames ``uint8 [B, H, W, 3]`` at ``boxes``.

    Same arguments and meaning as :func:`lipsync_runner.render.blend.blend_faces` (``landmarks``,
    ``masks``, ``weights``), on torch tensors on ``device`` (default: the frames' device).
    Returns a new tensor, or ``frames`` itself changed in place with ``inplace=True`` (a tensor
    already on ``device``).
    """
    x = _as_tensor(frames, device)
    if inplace and x is not frames:
        raise ValueError("inplace=True needs the frames as a tensor on the target device")
    out = x if inplace else x.clone()
    f = _as_tensor(faces, out.device)
    boxes = np.asarray(boxes).reshape(-1, 4)
    if not (len(out) == len(f) == len(boxes)):
        raise ValueError(f"{len(out)} frames, {len(f)} faces and {len(boxes)} boxes")
    if masks is not None and len(masks) != len(out):
        raise ValueError(f"{len(out)} frames but {len(masks)} masks")
    scale = blend_weights(weights, len(out))
    H, W = out.shape[1:3]

    jobs: list[tuple[int, tuple[int, int, int, int], BoxMask, float]] = []
    for i, box in enumerate(boxes):
        if not box_is_valid(box) or (scale is not None and scale[i] == 0):
            continue
        x1, y1, x2, y2 = clip_box(box, (H, W))
        if x2 <= x1 or y2 <= y1:
            continue
        bm = frame_mask(i, box, (x1, y1, x2, y2), landmarks, masks, upper_ratio=upper_ratio, feather=feather)
        if not bm.empty:
            jobs.append((i, (x1, y1, x2, y2), bm, 1.0 if scale is None else float(scale[i])))
    if not jobs:
        return out

    # Faces resized to their boxes (only each mask's rectangle of it), one batched matmul per filter.
    resized: dict[int, torch.Tensor] = {}
    groups: dict[str | None, list[int]] = {}
    for j, (i, (x1, y1, x2, y2), _, _) in enumerate(jobs):
        groups.setdefault(_face_resize_kind(tuple(f.shape[1:3]), (y2 - y1, x2 - x1)), []).append(j)
    for kind, members in groups.items():
        if kind is None:
            for j in members:
                bm = jobs[j][2]
                resized[j] = f[jobs[j][0], bm.r0 : bm.r1, bm.c0 : bm.c1]
            continue
        windows = []
        for j in members:
            (x1, y1, x2, y2), bm = jobs[j][1], jobs[j][2]
            windows.append((y2 - y1, x2 - x1, bm.r0, bm.r1, bm.c0, bm.c1))
        batch = _resize_batch([f[jobs[j][0]] for j in members], windows, [kind] * len(members), torch.float32)
        # area averages round half to even in OpenCV (cvRound), fixed-point bilinear rounds half up
        rounded = torch.round(batch).clamp_(0, 255).to(torch.uint8) if kind == "area" else _to_uint8(batch)
        for k, (j, win) in enumerate(zip(members, windows)):
            resized[j] = rounded[k, : win[3] - win[2], : win[5] - win[4]]

    # Masks (float32, the CPU module's cached arrays times the weight) to the device in one copy.
    rh = max(bm.r1 - bm.r0 for _, _, bm, _ in jobs)
    rw = max(bm.c1 - bm.c0 for _, _, bm, _ in jobs)
    stacked = np.zeros((len(jobs), rh, rw, 1), np.float32)
    for j, (_, _, bm, wgt) in enumerate(jobs):
        stacked[j, : bm.r1 - bm.r0, : bm.c1 - bm.c0] = bm.weights(wgt)
    mask_t = torch.from_numpy(stacked).to(out.device)

    for j, (i, (x1, y1, _, _), bm, _) in enumerate(jobs):
        rows, cols = bm.r1 - bm.r0, bm.c1 - bm.c0
        region = out[i, y1 + bm.r0 : y1 + bm.r1, x1 + bm.c0 : x1 + bm.c1]
        base = region.to(torch.float32)
        face = resized[j].to(torch.float32)
        blended = base + mask_t[j, :rows, :cols] * (face - base) + 0.5
        region.copy_(torch.floor(blended).to(torch.uint8))  # values in [0, 255.5): floor is rounding
    return out
