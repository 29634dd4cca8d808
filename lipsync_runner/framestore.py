"""Decoded frames kept on disk in one raw file, for ping-pong playback.

When the audio outlasts the video MuseTalk plays the frames forward, then backward,
and so on. A stream cannot run backward, so the frames of the first pass are kept in
a single raw file and read back with positioned reads (not a memory map, whose touched
pages would count against the process): memory stays flat, and no per-frame image files
are written. Only used when the audio outruns the video.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


class FrameStore:
    def __init__(self, height: int, width: int, directory: Path | str | None = None) -> None:
        self.shape = (height, width, 3)
        self._file = tempfile.NamedTemporaryFile(prefix="frames-", suffix=".rgb", dir=directory, delete=True)
        self._count = 0
        self._frame_bytes = height * width * 3

    def __len__(self) -> int:
        return self._count

    def append(self, frames: np.ndarray) -> None:
        assert frames.shape[1:] == self.shape, (frames.shape, self.shape)
        self._file.write(np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
        self._count += len(frames)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Frames at the given indices, as a new writable array."""
        self._file.flush()
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._count):
            raise IndexError(f"frame index out of range 0..{self._count - 1}")
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        fd = self._file.fileno()
        for row, index in enumerate(indices):
            view = memoryview(out[row]).cast("B")
            got = os.preadv(fd, [view], int(index) * self._frame_bytes)
            if got != self._frame_bytes:
                raise OSError(f"short read from the frame store ({got} of {self._frame_bytes} bytes)")
        return out

    def close(self) -> None:
        self._file.close()  # deletes the file

    def __enter__(self) -> "FrameStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pingpong_indices(output_indices: np.ndarray, n_frames: int) -> np.ndarray:
    """Source frame for each output frame: 0..N-1, N-1..0, 0..N-1, ... (MuseTalk's i % 2N cycle)."""
    if n_frames <= 0:
        raise ValueError("no source frames")
    k = np.asarray(output_indices, dtype=np.int64) % (2 * n_frames)
    return np.where(k < n_frames, k, 2 * n_frames - 1 - k)
