"""Prepare once, dub many: everything that depends only on the video, kept on disk.

Dubbing platforms send the same video again and again, once per target language. What
does not depend on the audio is computed once per distinct video and reused: the face
track (boxes, landmarks, which frames have a face) and the VAE latents of every face
crop (the two VAE encodes are most of a cold job's GPU time). An entry is keyed by the
video's content hash and every parameter that changes those results (bbox_shift, model
version and weights, detector, margins), so a change of models or settings never reuses
stale work.

    <root>/<key>/meta.json      parameters, frame count, sizes
    <root>/<key>/track.npz      FaceTrack
    <root>/<key>/latents.f32    [N, 8, 32, 32] float32, filled as frames are prepared
    <root>/<key>/prepared.u8    [N] 1 where latents[i] is valid (written after the latents)

Entries are built under a file lock (jobs in other processes wait for the first one),
latents are added under a per-entry lock, and the least recently used entries are
evicted past a size bound. Everything survives a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .faces import FaceTrack

log = logging.getLogger(__name__)

LATENT_SHAPE = (8, 32, 32)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class AvatarParams:
    """Everything besides the video's bytes that changes the cached results."""

    bbox_shift: int
    version: str
    extra_margin: int
    detector: str
    detect_every: int
    weights_id: str  # changes when the model files change
    face: str = '{"boxes":null,"face":"largest","point":null}'  # FaceChoice.key(): whose face is tracked

    def key(self, video_sha256: str) -> str:
        blob = json.dumps({"video": video_sha256, "format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


def file_sha256(path: Path, chunk: int = 4 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Avatar:
    """One cached video preparation, open for a job."""

    def __init__(self, folder: Path, track: FaceTrack, lock: threading.Lock) -> None:
        self.folder = folder
        self.track = track
        self._lock = lock
        n = len(track.has_face)
        self.latents = np.memmap(folder / "latents.f32", dtype=np.float32, mode="r+", shape=(n, *LATENT_SHAPE))
        self.prepared = np.memmap(folder / "prepared.u8", dtype=np.uint8, mode="r+", shape=(n,))
        self.computed = 0  # frames this job had to prepare itself

    def latents_for(self, frame_indices: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Latents of the given source frames; `compute(positions)` prepares the missing ones.

        `positions` index into `frame_indices`. Each missing frame is prepared once, even when a
        chunk names it twice (the turn of a ping-pong) or another job wants it at the same time.
        """
        frame_indices = np.asarray(frame_indices)
        with self._lock:
            missing = np.flatnonzero(self.prepared[frame_indices] == 0)
            if len(missing):
                _, first = np.unique(frame_indices[missing], return_index=True)
                todo = missing[np.sort(first)]
                values = compute(todo)
                self.latents[frame_indices[todo]] = values
                self.latents.flush()  # latents reach the disk before the flags that vouch for them
                self.prepared[frame_indices[todo]] = 1
                self.prepared.flush()
                self.computed += len(todo)
            return np.array(self.latents[frame_indices])


class AvatarCache:
    def __init__(self, root: Path | str, max_bytes: int = 20 * 2**30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._locks: dict[str, threading.Lock] = {}
        self._in_use: dict[str, int] = {}
        self._guard = threading.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.builds = 0  # face tracks built by this process (a hit builds none)

    def video_hash(self, path: Path) -> str:
        st = path.stat()
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._hashes:
            self._hashes[memo] = file_sha256(path)
        return self._hashes[memo]

    @contextmanager
    def open(self, key: str, build_track: Callable[[], FaceTrack]) -> Iterator[tuple[Avatar, bool]]:
        """The entry for `key`, built with `build_track()` if absent; yields (avatar, was_it_a_hit)."""
        folder = self.root / key
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
            self._in_use[key] = self._in_use.get(key, 0) + 1
        try:
            with lock, _file_lock(self.root / f"{key}.lock"):  # one build, across threads and processes
                hit = (folder / "meta.json").is_file()
                if not hit:
                    self._build(folder, build_track())
                track = _load_track(folder)
                _touch(folder)
            yield Avatar(folder, track, lock), hit
        finally:
            with self._guard:
                self._in_use[key] -= 1
            self.evict()

    def _build(self, folder: Path, track: FaceTrack) -> None:
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(track.has_face)
        arrays = {"boxes": track.boxes, "has_face": track.has_face}
        if track.landmarks is not None:
            arrays["landmarks"] = track.landmarks
        np.savez(tmp / "track.npz", **arrays)
        (tmp / "detector.txt").write_text(track.detector)
        np.memmap(tmp / "latents.f32", dtype=np.float32, mode="w+", shape=(n, *LATENT_SHAPE)).flush()
        np.memmap(tmp / "prepared.u8", dtype=np.uint8, mode="w+", shape=(n,)).flush()
        (tmp / "meta.json").write_text(json.dumps({"frames": n, "created": time.time()}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # an entry appears whole or not at all
        self.builds += 1

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def evict(self) -> list[str]:
        """Remove least recently used entries (not in use) until the cache fits its bound."""
        entries = []
        for folder in self.root.iterdir():
            if folder.is_dir() and (folder / "meta.json").is_file():
                size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
                entries.append(((folder / "last_used").stat().st_mtime if (folder / "last_used").exists() else 0,
                                folder, size))
        total = sum(size for _, _, size in entries)
        removed = []
        for _, folder, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            with self._guard:
                if self._in_use.get(folder.name):
                    continue
            with _file_lock(self.root / f"{folder.name}.lock"):
                shutil.rmtree(folder, ignore_errors=True)
            (self.root / f"{folder.name}.lock").unlink(missing_ok=True)
            total -= size
            removed.append(folder.name)
        return removed


def _load_track(folder: Path) -> FaceTrack:
    with np.load(folder / "track.npz") as data:
        landmarks = data["landmarks"] if "landmarks" in data.files else None
        return FaceTrack(boxes=data["boxes"], landmarks=landmarks, has_face=data["has_face"],
                         detector=(folder / "detector.txt").read_text())


def _touch(folder: Path) -> None:
    (folder / "last_used").write_text(str(time.time()))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
