"""One array per frame at the runner boundary.

BentoML's adaptive batching merges calls whose single argument is an array, along axis
0. `generate` needs latents and audio windows, so both travel in one float32 row per
frame, led by a job tag: the runner can then count how many jobs share a batch.
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
