"""Decoded frames kept on disk in one raw file, for ping-pong playback.

When the audio outlasts the video MuseTalk plays the frames forward, then backward,
and so on. A stream cannot run backward, so the frames of the first pass are kept in
a single memory-mapped file: memory stays flat (pages belong to the OS cache), and no
per-frame image files are written. Only used when the audio may outrun the video.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


class FrameStore:
    def __init__(self, height: int, width: int, directory: Path | str | None = None) -> None:
        self.shape = (height, width, 3)
        self._file = tempfile.NamedTemporaryFile(prefix="frames-", suffix=".rgb", dir=directory, delete=True)
        self._count = 0
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return self._count

    def append(self, frames: np.ndarray) -> None:
        assert frames.shape[1:] == self.shape, (frames.shape, self.shape)
        self._file.write(np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
        self._count += len(frames)
        self._map = None

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Frames at the given indices, as a new writable array."""
        if self._map is None:
            self._file.flush()
            self._map = np.memmap(self._file.name, dtype=np.uint8, mode="r", shape=(self._count, *self.shape))
        return np.array(self._map[np.asarray(indices)])

    def close(self) -> None:
        self._map = None
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
