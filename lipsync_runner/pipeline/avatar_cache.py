"""Prepare once, dub many: everything that depends only on the video, kept on disk.

Dubbing platforms send the same video again and again, once per target language. What
does not depend on the audio is computed once per distinct video and reused: the face
track (boxes, landmarks, which frames have a face) and the VAE latents of every face
crop (the two VAE encodes are most of a cold job's GPU time). An entry is keyed by the
video's content hash and every parameter that changes those results (bbox_shift, model
version and weights, detector, margins, the choice of face; with face=speaker the audio
too, since it picks the person), so a change of models or settings never reuses stale work.

    <root>/<key>/meta.json      frame count, when it was built, whose it is (owner)
    <root>/<key>/track.npz      FaceTrack
    <root>/<key>/faces.json     the chosen track's id and the summary of every face track
    <root>/<key>/latents.f32    [N, 8, 32, 32] float32, filled as frames are prepared
    <root>/<key>/prepared.u8    [N] 1 where latents[i] is valid (written after the latents)
    <root>/<key>/jobs/<job_id>  the jobs that used the entry (cleanup releases them)
    <root>/<key>/pins/<id>      the avatars (POST /avatars) stored in the entry
    <root>/<key>.build          flock: one build at a time, across threads and processes
    <root>/<key>.use            flock: shared while a job uses the entry, exclusive to remove it

Tenants: latents decode back to face images, and a hit (or its speed) tells that the
video was seen before. So with jobs scoped per token (`for_job(job_id, owner)`), an entry
belongs to its owner: another owner's job makes its own entry and never sees a hit on
someone else's. An entry goes when the last job that used it is cleaned up, when it has
not been used for the retention time, or when the size bound evicts it (least recently
used first). An entry in use is never removed, by any process: its use lock is shared,
removal needs it exclusively. Build directories a crash left behind count towards the
size and are reclaimed.

Avatars: an avatar (a video prepared once, then dubbed by ``avatar_id``) is stored as an
entry pinned by the avatar's id. A pinned entry is never evicted nor expired for want of
use: it lives as long as its avatar's record. When the avatar is deleted or expires
(``release_job(avatar_id)``), its entry goes at once, whichever jobs used it, unless a job
is using it right now (then it goes like an unpinned entry). A pin whose avatar no longer
exists (a crash between the two) is dropped by ``expire(..., live=...)``.

Room for avatars: since pinned entries are never evicted, a new avatar is refused (507) once the
avatars kept fill the cache's bound, and, with ``max_owner_bytes``, once its owner's avatars fill
that owner's share, so one owner cannot take the room every other owner needs
(``check_room_for_avatar(owner)``: admission asks first, and an avatar about to pin a new entry
asks again, since others may have filled the room while it waited). Owner None (jobs not scoped)
is one owner.
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

from lipsync_runner.errors import InsufficientStorageError
from lipsync_runner.faces import FaceTrack
from lipsync_runner.media.digests import file_sha256

log = logging.getLogger(__name__)

LATENT_SHAPE = (8, 32, 32)
FORMAT_VERSION = 1
BUILD_SUFFIX = ".tmp"  # <key>.tmp<pid>: an entry being built by process <pid>
STALE_BUILD_S = 3600.0  # a build directory this old is abandoned even if its pid was reused


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


def owner_key(key: str, owner: str | None) -> str:
    """The entry key of `key` for `owner` (None: the shared, unscoped entry)."""
    if owner is None:
        return key
    return hashlib.sha256(f"{key}/{owner}".encode()).hexdigest()[:32]


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
    def __init__(self, root: Path | str, max_bytes: int = 20 * 2**30, max_owner_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_owner_bytes = max_owner_bytes  # what one owner's avatars may keep (None: only the bound)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.builds = 0  # face tracks built by this process (a hit builds none)
        self.reclaim_builds()

    def video_hash(self, path: Path) -> str:
        st = path.stat()
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in self._hashes:
            self._hashes[memo] = file_sha256(path)
        return self._hashes[memo]

    def for_job(self, job_id: str, owner: str | None, *, pin: bool = False) -> "JobAvatarCache":
        """The cache as one job sees it: entries of its owner only, the job recorded as a user.
        ``pin``: the job is an avatar, stored in the entry it opens (see the module's docstring)."""
        return JobAvatarCache(self, job_id, owner, pin=pin)

    @contextmanager
    def open(self, key: str, build_track: Callable[[], FaceTrack], *, job_id: str | None = None,
             pin: bool = False, owner: str | None = None) -> Iterator[tuple[Avatar, bool]]:
        """The entry for `key` (``owner``'s), built with `build_track()` if absent; yields (avatar,
        was_it_a_hit). ``pin`` (with ``job_id``): the entry now stores the avatar ``job_id``; refused
        (InsufficientStorageError) when that would pin a new entry and there is no room for it."""
        folder = self.root / key
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        try:
            with _flock(self.root / f"{key}.use", fcntl.LOCK_SH):  # nobody removes it while we use it
                with lock, _flock(self.root / f"{key}.build", fcntl.LOCK_EX):  # one build
                    hit = (folder / "meta.json").is_file()
                    if pin and job_id is not None and not _pinned(folder):
                        self.check_room_for_avatar(owner)  # before the work of a build
                    if not hit:
                        self._build(folder, build_track(), owner)
                    track = _load_track(folder)
                    _touch(folder)
                    if job_id is not None:
                        (folder / "jobs").mkdir(exist_ok=True)
                        (folder / "jobs" / job_id).touch()
                        if pin:
                            (folder / "pins").mkdir(exist_ok=True)
                            (folder / "pins" / job_id).touch()
                yield Avatar(folder, track, lock), hit
        finally:
            self.evict()

    def _build(self, folder: Path, track: FaceTrack, owner: str | None) -> None:
        tmp = folder.with_name(f"{folder.name}{BUILD_SUFFIX}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        n = len(track.has_face)
        arrays = {"boxes": track.boxes, "has_face": track.has_face}
        if track.landmarks is not None:
            arrays["landmarks"] = track.landmarks
        np.savez(tmp / "track.npz", **arrays)
        (tmp / "detector.txt").write_text(track.detector)
        # who was found and dubbed: a warm job's status lists the same people as the cold one's
        (tmp / "faces.json").write_text(json.dumps({"track_id": track.track_id, "summary": track.summary}))
        np.memmap(tmp / "latents.f32", dtype=np.float32, mode="w+", shape=(n, *LATENT_SHAPE)).flush()
        np.memmap(tmp / "prepared.u8", dtype=np.uint8, mode="w+", shape=(n,)).flush()
        (tmp / "meta.json").write_text(json.dumps({"frames": n, "created": time.time(), "owner": owner}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)  # an entry appears whole or not at all
        self.builds += 1

    # ------------------------------------------------------------------ what goes, and when

    def _entries(self) -> list[tuple[float, Path, int]]:
        entries = []
        for folder in self.root.iterdir():
            if folder.is_dir() and (folder / "meta.json").is_file():
                last = folder / "last_used"
                entries.append((last.stat().st_mtime if last.exists() else 0.0, folder, _tree_bytes(folder)))
        return entries

    def size_bytes(self) -> int:
        return _tree_bytes(self.root)

    def pinned_bytes(self) -> int:
        """What the avatars' entries take (they are never evicted: only deleting avatars frees it)."""
        return sum(size for _, folder, size in self._entries() if _pinned(folder))

    def owners_pinned_bytes(self, owner: str | None) -> int:
        """What ``owner``'s avatars' entries take (None: the unscoped owner; entries from before owners
        were recorded count as its)."""
        return sum(size for _, folder, size in self._entries() if _pinned(folder) and _owner(folder) == owner)

    def check_room_for_avatar(self, owner: str | None = None) -> None:
        """InsufficientStorageError (507) when ``owner``'s avatars already fill its share
        (``max_owner_bytes``: that owner only is refused; owner None, an unscoped deployment's only
        tenant, has the whole cache), or the avatars' entries of every owner
        already fill the size bound: another avatar could only push the cache past it, since
        eviction never takes an avatar's entry."""
        if self.max_owner_bytes is not None and owner is not None:  # None: jobs not scoped, one tenant
            mine = self.owners_pinned_bytes(owner)
            if mine >= self.max_owner_bytes:
                raise InsufficientStorageError(
                    f"Cannot store another avatar: your avatars already fill your share of the avatar cache "
                    f"({mine / 2**30:.2f} of {self.max_owner_bytes / 2**30:.2f} GB per owner, "
                    "LIP_SYNC_AVATAR_CACHE_GB_PER_OWNER); delete avatars you no longer need "
                    "(DELETE /api/lip-sync/avatars/{avatar_id}) and try again")
        pinned = self.pinned_bytes()
        if pinned >= self.max_bytes:
            raise InsufficientStorageError(
                f"Cannot store another avatar: the avatars kept already fill the avatar cache ({pinned / 2**30:.2f} "
                f"of {self.max_bytes / 2**30:.2f} GB, LIP_SYNC_AVATAR_CACHE_GB); delete avatars you no longer need "
                "(DELETE /api/lip-sync/avatars/{avatar_id}) and try again")

    def remove(self, key: str) -> bool:
        """Delete an entry unless a job (in any process) is using it; True if it is gone."""
        try:
            with _flock(self.root / f"{key}.use", fcntl.LOCK_EX | fcntl.LOCK_NB, unlink=True):
                shutil.rmtree(self.root / key, ignore_errors=True)
                (self.root / f"{key}.build").unlink(missing_ok=True)
        except BlockingIOError:
            return False
        return True

    def evict(self) -> list[str]:
        """Remove least recently used entries (not in use, not an avatar's) until the cache fits its bound."""
        entries = self._entries()
        total = self.size_bytes()
        removed = []
        for _, folder, size in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if not _pinned(folder) and self.remove(folder.name):
                total -= size
                removed.append(folder.name)
        return removed

    def expire(self, max_age_s: float, now: float | None = None, *,
               live: Callable[[str], bool] | None = None) -> list[str]:
        """Remove entries not used for `max_age_s` (the retention setting), and abandoned builds.

        Avatars' entries stay (they go with their avatar); ``live(avatar_id)`` says whether an
        avatar still exists: the pins of those that do not are dropped first."""
        cutoff = (now if now is not None else time.time()) - max_age_s
        self.reclaim_builds()
        if live is not None:
            for pin in list(self.root.glob("*/pins/*")):
                if not live(pin.name):
                    log.info("avatar %s is gone: unpinning its cache entry", pin.name)
                    pin.unlink(missing_ok=True)
        return [folder.name for last, folder, _ in self._entries()
                if last <= cutoff and not _pinned(folder) and self.remove(folder.name)]

    def release_job(self, job_id: str) -> list[str]:
        """A job is gone (cleaned up, expired): forget it, and remove the entries no other job uses.
        An avatar's entry goes with the avatar, whichever jobs used it (unless one is using it now)."""
        removed = []
        for pin in self.root.glob(f"*/pins/{job_id}"):
            folder = pin.parent.parent
            pin.unlink(missing_ok=True)
            (folder / "jobs" / job_id).unlink(missing_ok=True)
            if not _pinned(folder) and self.remove(folder.name):
                removed.append(folder.name)
        for ref in self.root.glob(f"*/jobs/{job_id}"):
            folder = ref.parent.parent
            ref.unlink(missing_ok=True)
            if not any((folder / "jobs").iterdir()) and not _pinned(folder) and self.remove(folder.name):
                removed.append(folder.name)
        return removed

    def release_missing(self, exists: Callable[[str], bool]) -> list[str]:
        """Release the jobs for which ``exists(job_id)`` is False: with replicas, a job may be cleaned
        up on one that did not run it, so each one reconciles its own cache with the shared store."""
        removed = []
        for job_id in {ref.name for ref in self.root.glob("*/jobs/*")}:
            if not exists(job_id):
                removed += self.release_job(job_id)
        return removed

    def reclaim_builds(self) -> list[str]:
        """Build directories whose process is gone (a crash mid-build), or that are too old."""
        reclaimed = []
        for tmp in self.root.glob(f"*{BUILD_SUFFIX}*"):
            pid = tmp.name.rsplit(BUILD_SUFFIX, 1)[-1]
            try:
                stale = time.time() - tmp.stat().st_mtime > STALE_BUILD_S
            except FileNotFoundError:
                continue
            if tmp.is_dir() and (not pid.isdigit() or not _alive(int(pid)) or stale):
                shutil.rmtree(tmp, ignore_errors=True)
                reclaimed.append(tmp.name)
        return reclaimed


class JobAvatarCache:
    """What the pipeline sees of the cache for one job (the same calls as AvatarCache)."""

    def __init__(self, cache: AvatarCache, job_id: str | None, owner: str | None, *, pin: bool = False) -> None:
        # job_id None: a preview, which uses an entry without being recorded as one of its jobs
        self.cache, self.job_id, self.owner, self.pin = cache, job_id, owner, pin

    def video_hash(self, path: Path) -> str:
        return self.cache.video_hash(path)

    @contextmanager
    def open(self, key: str, build_track: Callable[[], FaceTrack]) -> Iterator[tuple[Avatar, bool]]:
        with self.cache.open(owner_key(key, self.owner), build_track, job_id=self.job_id, pin=self.pin,
                             owner=self.owner) as opened:
            yield opened


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pinned(folder: Path) -> bool:
    """Whether an avatar is stored in this entry."""
    try:
        return any((folder / "pins").iterdir())
    except FileNotFoundError:
        return False


def _owner(folder: Path) -> str | None:
    """Whose entry this is, as its build recorded it."""
    try:
        return json.loads((folder / "meta.json").read_text()).get("owner")
    except (FileNotFoundError, ValueError):
        return None


def _tree_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _load_track(folder: Path) -> FaceTrack:
    with np.load(folder / "track.npz") as data:
        landmarks = data["landmarks"] if "landmarks" in data.files else None
        faces = folder / "faces.json"  # absent in entries built before face tracks had a summary
        found = json.loads(faces.read_text()) if faces.is_file() else {}
        return FaceTrack(boxes=data["boxes"], landmarks=landmarks, has_face=data["has_face"],
                         detector=(folder / "detector.txt").read_text(), track_id=found.get("track_id"),
                         summary=found.get("summary"))


def _touch(folder: Path) -> None:
    (folder / "last_used").write_text(str(time.time()))


@contextmanager
def _flock(path: Path, mode: int, *, unlink: bool = False) -> Iterator[None]:
    """flock on `path`, re-opened until the locked file is the one at `path` (a remover may have
    unlinked it meanwhile); with `unlink`, the file is removed while still held."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
        if unlink:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
