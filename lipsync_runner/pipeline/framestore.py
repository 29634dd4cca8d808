"""The video's frames by index, decoded once: a raw on-disk frame store and the source that fills it.

Why one decode, and why a store on disk. Faces are tracked over the whole video before the
first frame is rendered: the choice of face (largest, speaker) and the plan (sync mode,
segments) are whole-video decisions, and box smoothing looks ahead. Until the track exists,
the decoded frames must wait somewhere. The choices were:

* decode twice (track, then decode again to render): no scratch disk, but decoding is the
  largest CPU stage around the model (about 11 ms per 720p frame, per pass, on our 2 cores);
* a bounded look-ahead queue (render while tracking): flat memory and no disk, but it cannot
  serve whole-video decisions, which would then need another pass anyway;
* keep the decoded frames (what this module does): RGB frames are appended raw to one scratch
  file while the faces are tracked, and the render reads them back by index with positioned
  reads. Writing and reading back a frame costs a fraction of decoding it (mostly a copy through
  the page cache), memory stays flat in video length (no memory map whose touched pages would
  count against the process, no per-frame image files), and backward playback (bounce) comes free.

The price is scratch disk: frames x width x height x 3 bytes (`store_bytes`), which admission
reserves. A cold job spools only while that stays under a bound (`max_spool_bytes`); beyond it
the video is decoded a second time instead, unless the plan goes backward in the video, which
needs the store at any size. With a cached face track, a plan that only moves forward renders
from one straight decode with no store; a plan that goes back fills the store lazily while
rendering forward (still one decode).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import numpy as np

from lipsync_runner.errors import MediaProcessingError


def store_bytes(n_frames: int, width: int, height: int) -> int:
    """Scratch disk of a frame store holding `n_frames` RGB frames."""
    return int(n_frames) * int(width) * int(height) * 3


class FrameStore:
    """Frames appended once, read back in any order; the scratch file is deleted on close."""

    def __init__(self, height: int, width: int, directory: Path | str | None = None) -> None:
        self.shape = (height, width, 3)
        self._file = tempfile.NamedTemporaryFile(prefix="frames-", suffix=".rgb", dir=directory, delete=True)
        self._count = 0
        self._frame_bytes = height * width * 3

    def __len__(self) -> int:
        return self._count

    def append(self, frames: np.ndarray) -> None:
        assert frames.shape[1:] == self.shape, (frames.shape, self.shape)
        self._file.write(memoryview(np.ascontiguousarray(frames, dtype=np.uint8)).cast("B"))
        self._count += len(frames)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Frames at the given indices, as a new writable array."""
        self._file.flush()
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._count):
            raise IndexError(f"frame index out of range 0..{self._count - 1}")
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        fd = self._file.fileno()
        # one positioned read per run of consecutive indices (a forward plan reads a chunk in one call)
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for run in np.split(np.arange(len(indices)), breaks) if indices.size else ():
            first, n = int(run[0]), len(run)
            view = memoryview(out[first:first + n]).cast("B")
            want, got = len(view), 0
            while got < want:  # a large positioned read may return short; a zero return is a truncated store
                step = os.preadv(fd, [view[got:]], int(indices[first]) * self._frame_bytes + got)
                if step <= 0:
                    raise OSError(f"short read from the frame store ({got} of {want} bytes)")
                got += step
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


class ChunkReader(Protocol):
    def read_chunk(self, n: int) -> np.ndarray: ...
    def close(self) -> None: ...


Clock = Callable[[str], AbstractContextManager]


def _no_clock(stage: str) -> AbstractContextManager:
    return nullcontext()


class FrameSource:
    """Frames of one video by index, each decoded once.

    Frames are decoded in order as requests reach them; each decoded frame is appended to the
    `store` when there is one. A request may name any frame already decoded (served from the
    store; the frame just before the next undecoded one is also kept in memory, so a forward plan
    that repeats frames needs no store) and any frame ahead (decoded now). Requests of exactly the
    next frames in order get the decoder's own buffer: no copy.

    `clock(stage)` times "decode" (waiting for ffmpeg's frames), "spool" (writing them to the
    store) and "store" (reading them back).
    """

    def __init__(self, open_reader: Callable[[], ChunkReader], shape: tuple[int, int, int], *,
                 store: FrameStore | None = None, clock: Clock | None = None, name: str = "the video") -> None:
        self._open = open_reader
        self.shape = shape
        self.store = store
        self._clock = clock or _no_clock
        self._name = name
        self._reader: ChunkReader | None = None
        self.decoded = 0  # frames decoded so far (and in the store, when there is one)
        self._last: np.ndarray | None = None  # an untouched copy of frame decoded - 1
        self.exhausted = False

    @property
    def complete(self) -> bool:
        """Every frame was decoded into the store: any request is served without decoding."""
        return self.exhausted and self.store is not None

    def _read(self, n: int, spool: bool = True, timed: bool = True) -> np.ndarray:
        """The next `n` frames (fewer at the end); appended to the store here unless `spool` is False
        (then the caller appends them, in order, before anything reads the store)."""
        if self._reader is None:
            self._reader = self._open()
        with self._clock("decode") if timed else nullcontext():
            chunk = self._reader.read_chunk(n)
        if len(chunk) < n:
            self.exhausted = True
        if spool and self.store is not None and len(chunk):
            assert len(self.store) == self.decoded, "the store must hold every decoded frame"
            with self._clock("spool"):
                self.store.append(chunk)
        self.decoded += len(chunk)
        if len(chunk):
            self._last = chunk[-1].copy()
        return chunk

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Decode the rest of the video in order, `size` frames at a time, as read-only chunks.

        While the caller works on chunk k (face detection), chunk k+1 is read from ffmpeg by a second
        thread (ffmpeg's pipe holds far less than a chunk, so without it decoding waits for the
        caller) and, with a store, chunk k is written to the store by a third: reading and writing a
        720p frame cost a few ms each, which would otherwise add to every frame of the tracking pass.
        At most one read and one write are in flight (two extra chunks in memory). The store is
        complete when the iteration ends; a failed write (disk full) is raised there at the latest.
        "decode" and "spool" time only the caller's waits for them."""
        store = self.store
        assert store is None or len(store) == self.decoded, "the store must hold every decoded frame"
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="lipsync-decode") as pool:

            def read_ahead() -> Future | None:  # the pool times nothing and spools nothing: see above
                return None if self.exhausted else pool.submit(self._read, size, spool=False, timed=False)

            reading = read_ahead()
            writing: Future | None = None
            finished = False
            try:
                while reading is not None:
                    with self._clock("decode"):
                        chunk = reading.result()
                    reading = read_ahead()
                    if not len(chunk):
                        continue
                    chunk.flags.writeable = False  # the store gets these bytes after the caller has seen them
                    if store is not None:
                        if writing is not None:
                            with self._clock("spool"):
                                writing.result()
                        writing = pool.submit(store.append, chunk)
                    yield chunk
                finished = True
            finally:
                with self._clock("spool"):
                    wait([f for f in (reading, writing) if f is not None])
                if finished and writing is not None:
                    writing.result()  # a failed last write fails the job; when stopped early, the stop wins

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Frames at `indices` as [k, H, W, 3], writable (changing them changes no later request)."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            return np.empty((0, *self.shape), dtype=np.uint8)
        if idx[0] == self.decoded and np.all(np.diff(idx) == 1):  # the next frames, in order
            chunk = self._read(len(idx))
            if len(chunk) < len(idx):
                raise MediaProcessingError(f"{self._name} ended early on the second read")
            return chunk
        prev_index, prev_last = self.decoded - 1, self._last
        ahead = idx > prev_index
        if self.store is not None and not ahead.any():
            with self._clock("store"):  # all decoded (a render after tracking): read straight into the result, one copy
                return self.store.take(idx)
        out = np.empty((len(idx), *self.shape), dtype=np.uint8)
        if ahead.any():
            first = self.decoded
            chunk = self._read(int(idx.max()) + 1 - first)
            if first + len(chunk) <= idx.max():
                raise MediaProcessingError(f"{self._name} ended early on the second read")
            out[ahead] = chunk[idx[ahead] - first]
        kept = ~ahead & (idx == prev_index) if prev_last is not None else np.zeros(len(idx), dtype=bool)
        if kept.any():
            out[kept] = prev_last
        stored = ~ahead & ~kept
        if stored.any():
            if self.store is None:
                raise RuntimeError("the plan goes back in the video but its frames were not stored")
            with self._clock("store"):
                out[stored] = self.store.take(idx[stored])
        return out

    def rewind(self, store: FrameStore | None = None) -> None:
        """Start decoding again from frame 0 (optionally into a new, empty store)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.store is not None and self.store is not store:
            self.store.close()
        self.store = store
        self.decoded = 0
        self._last = None
        self.exhausted = False

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.store is not None:
            self.store.close()
            self.store = None
