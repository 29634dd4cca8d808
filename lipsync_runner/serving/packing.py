"""One array per frame at the runner boundary.

BentoML's adaptive batching merges calls whose single argument is an array, along axis
0. `generate` needs latents and audio windows, so both travel in one float32 row per
frame, led by a job tag: the runner can then count how many jobs share a batch.

`prepare_generate` (a job's frames that need both, in one round trip) sends one uint8 row per
frame: the 256x256 RGB face crop as it is (uint8, not a float array), the audio window's float32
bytes and the job tag, so the latents never leave the GPU. BentoML pickles arrays with protocol 5
and out-of-band buffers, so the wire carries each row's bytes plus a few hundred bytes per call:

========================  ==========================  ===============================
path                      to the runner, per frame     back, per frame
========================  ==========================  ===============================
prepare, then generate    196,608 + 109,572 B          32,768 + 196,608 B (535,556 B)
prepare_generate          273,416 B (RENDER_ROW_BYTES)  196,608 B (470,024 B in all)
prepare_generate_latents  273,416 B                   229,376 B: the face and its latents
========================  ==========================  ===============================

`prepare_generate_latents` is the avatar cache's form: a cold frame's latents come back with its face
(one uint8 row, unpack_faces_latents) so that the next job on the video skips its VAE encode.
"""

from __future__ import annotations

import zlib

import numpy as np

LATENT_SHAPE = (8, 32, 32)  # masked + reference 4-channel latents of a 256x256 crop
LATENT_SIZE = int(np.prod(LATENT_SHAPE))


def job_tag(job_id: str) -> float:
    """A small integer identifying a job, exact in float32 (< 2**24)."""
    return float(zlib.crc32(job_id.encode()) & 0xFFFFFF)


def pack_generate(latents: np.ndarray, windows: np.ndarray, tag: float = 0.0) -> np.ndarray:
    """[B, 8, 32, 32] + [B, T, D] -> [B, 1 + 8192 + T*D] float32."""
    b = len(latents)
    out = np.empty((b, 1 + LATENT_SIZE + int(np.prod(windows.shape[1:]))), dtype=np.float32)
    out[:, 0] = tag
    out[:, 1 : 1 + LATENT_SIZE] = latents.reshape(b, -1)
    out[:, 1 + LATENT_SIZE :] = windows.reshape(b, -1)
    return out


def unpack_generate(packed: np.ndarray, d_model: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_generate: (tags [B], latents [B, 8, 32, 32], windows [B, T, D])."""
    b = len(packed)
    tags = packed[:, 0]
    latents = packed[:, 1 : 1 + LATENT_SIZE].reshape(b, *LATENT_SHAPE)
    windows = packed[:, 1 + LATENT_SIZE :].reshape(b, -1, d_model)
    return tags, latents, windows


CROP_BYTES = 256 * 256 * 3  # one uint8 RGB face crop
RENDER_HEADER_BYTES = 8  # float32 job tag, then 4 bytes of padding (keeps the crop 8-byte aligned)
WINDOW_SHAPE = (50, 384)  # MuseTalk's audio window per frame: 50 Whisper steps x 384
RENDER_ROW_BYTES = RENDER_HEADER_BYTES + CROP_BYTES + int(np.prod(WINDOW_SHAPE)) * 4


def pack_render(crops: np.ndarray, windows: np.ndarray, tag: float = 0.0) -> np.ndarray:
    """[B, 256, 256, 3] uint8 crops + [B, T, D] float32 windows -> [B, 8 + 196608 + T*D*4] uint8."""
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.shape[1:] != (256, 256, 3):
        raise ValueError(f"expected uint8 crops [B, 256, 256, 3], got {crops.dtype} {crops.shape}")
    b = len(crops)
    window_bytes = np.ascontiguousarray(windows, dtype=np.float32).reshape(b, -1).view(np.uint8)
    out = np.zeros((b, RENDER_HEADER_BYTES + CROP_BYTES + window_bytes.shape[1]), dtype=np.uint8)
    out[:, :4] = np.full(b, tag, np.float32).view(np.uint8).reshape(b, 4)
    out[:, RENDER_HEADER_BYTES : RENDER_HEADER_BYTES + CROP_BYTES] = crops.reshape(b, -1)
    out[:, RENDER_HEADER_BYTES + CROP_BYTES :] = window_bytes
    return out


def unpack_render(packed: np.ndarray, d_model: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of pack_render: (tags [B] float32, crops [B, 256, 256, 3] uint8, windows [B, T, D] float32)."""
    packed = np.ascontiguousarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] <= RENDER_HEADER_BYTES + CROP_BYTES:
        raise ValueError(f"expected uint8 rows of a crop and an audio window, got {packed.dtype} {packed.shape}")
    b = len(packed)
    tags = packed[:, :4].copy().view(np.float32).reshape(b)
    crops = packed[:, RENDER_HEADER_BYTES : RENDER_HEADER_BYTES + CROP_BYTES].reshape(b, 256, 256, 3)
    windows = packed[:, RENDER_HEADER_BYTES + CROP_BYTES :].copy().view(np.float32).reshape(b, -1, d_model)
    return tags, crops, windows


FACE_BYTES = CROP_BYTES  # a generated 256x256 RGB face, uint8
LATENT_BYTES = LATENT_SIZE * 4  # its float32 latents


def pack_faces_latents(faces: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """[B, 256, 256, 3] uint8 + [B, 8, 32, 32] float32 -> [B, 196608 + 32768] uint8."""
    b = len(faces)
    out = np.empty((b, FACE_BYTES + LATENT_BYTES), np.uint8)
    out[:, :FACE_BYTES] = np.asarray(faces, np.uint8).reshape(b, -1)
    out[:, FACE_BYTES:] = np.ascontiguousarray(latents, dtype=np.float32).reshape(b, -1).view(np.uint8)
    return out


def unpack_faces_latents(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_faces_latents: (faces [B, 256, 256, 3] uint8, latents [B, 8, 32, 32] float32)."""
    rows = np.ascontiguousarray(rows)
    b = len(rows)
    return (rows[:, :FACE_BYTES].reshape(b, 256, 256, 3),
            rows[:, FACE_BYTES:].copy().view(np.float32).reshape(b, *LATENT_SHAPE))
