"""Where a job's files live: ``<data_dir>/jobs/<job_id>/`` holds its inputs and its output.

Every path is built from a job id that must be a canonical uuid4 (:func:`is_job_id`);
anything else -- ``..``, an empty string, a NUL byte, an uppercase uuid -- is answered
with :class:`JobNotFoundError` before the filesystem is touched. File names inside a
job directory are chosen by the service (never the user's names) and must be plain
names (no separators, no leading dot).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Collection, Container
from pathlib import Path

from lipsync_runner.errors import InsufficientStorageError, JobNotFoundError
from lipsync_runner.params import is_job_id

log = logging.getLogger(__name__)

JOBS_DIRNAME = "jobs"
OUTPUT_NAME = "output.mp4"  # an mp4 job's result; others: output_name(format)
LOCK_NAME = "jobs.lock"
CREDENTIALS_NAME = "credentials.json"  # the output's content credentials (C2PA manifest store) as read back
# Scratch files a crashed run may leave in a job directory: the video writer's hidden
# ".<name>.<hex>.part", the frame store's "frames-*.rgb", our own ".*.tmp", and the progressive
# output's segment cut short (ffmpeg's "live-seg*.m4s.tmp", media/hls.py).
TEMP_PATTERNS = (".*.part", "frames-*.rgb", ".*.tmp", "live-*.tmp")


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def output_name(output_format: str = "mp4") -> str:
    """The result's file name in a job's directory: its suffix is the format (output.webm)."""
    return f"output.{output_format}"


def is_plain_name(name: str) -> bool:
    """A file name that stays inside its directory: no separators, no NUL, not hidden, not '.'/'..'."""
    return (
        isinstance(name, str)
        and bool(name)
        and name == os.path.basename(name)
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
    )


class JobFiles:
    """The on-disk layout of jobs under one data directory."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / JOBS_DIRNAME
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    # -- paths -----------------------------------------------------------------------------

    def job_dir(self, job_id: str, create: bool = False) -> Path:
        """The job's directory (created if asked); :class:`JobNotFoundError` for a malformed id."""
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        path = self.root / job_id
        if create:
            path.mkdir(exist_ok=True)
        return path

    def path(self, job_id: str, name: str) -> Path:
        """A file inside the job's directory; ``ValueError`` unless ``name`` is a plain file name."""
        directory = self.job_dir(job_id)
        if not is_plain_name(name):
            raise ValueError(f"not a plain file name: {name!r}")
        return directory / name

    def output_path(self, job_id: str, output_format: str = "mp4") -> Path:
        """Where the result goes (the pipeline's writer renames its temp file onto it)."""
        return self.job_dir(job_id) / output_name(output_format)

    def temp_output_path(self, job_id: str) -> Path:
        """A scratch name for executors that do not write atomically themselves: write here,
        then ``os.replace`` onto :meth:`output_path`. Left over after a crash, it is an orphan."""
        return self.job_dir(job_id) / f".{OUTPUT_NAME}.tmp"

    # -- removal ---------------------------------------------------------------------------

    def remove(self, job_id: str) -> None:
        """Delete the job's directory and everything in it; nothing happens if it is gone."""
        self._rmtree(self.job_dir(job_id))

    def remove_orphan(self, path: Path) -> None:
        """Delete one entry returned by :meth:`orphans` (a job directory or a temp file)."""
        path = Path(path)
        if path.parent != self.root and path.parent.parent != self.root:
            raise ValueError(f"{path} is not inside {self.root}")
        if path.is_dir() and not path.is_symlink():
            self._rmtree(path)
        else:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    @staticmethod
    def _rmtree(path: Path) -> None:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass

    def orphans(
        self, known_ids: Container[str], active_ids: Collection[str] = (), min_age_s: float = 0.0
    ) -> list[Path]:
        """What nothing refers to any more.

        * job directories whose id is not in ``known_ids`` (no record);
        * temp files (:data:`TEMP_PATTERNS`) in the directories of jobs that are not in
          ``active_ids`` (not running or being uploaded here): leftovers of a crash.

        Entries modified less than ``min_age_s`` ago are skipped (something may be
        creating them right now). Entries whose name is not a job id are left alone.
        """
        found: list[Path] = []
        cutoff = time.time() - min_age_s
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            return found

        def old_enough(p: Path) -> bool:
            if min_age_s <= 0:
                return True
            try:
                return p.lstat().st_mtime <= cutoff
            except FileNotFoundError:
                return False

        for entry in entries:
            if not is_job_id(entry.name) or not entry.is_dir() or entry.is_symlink():
                continue
            if entry.name not in known_ids:
                if old_enough(entry):
                    found.append(entry)
                continue
            if entry.name in active_ids:
                continue
            temps = {p for pattern in TEMP_PATTERNS for p in entry.glob(pattern)}
            found.extend(p for p in sorted(temps) if old_enough(p))
        return found

    # -- space -----------------------------------------------------------------------------

    def free_bytes(self) -> int:
        return int(shutil.disk_usage(self.root).free)

    def check_free_space(self, floor_bytes: int) -> None:
        """:class:`InsufficientStorageError` when less than ``floor_bytes`` is free (0 disables)."""
        if floor_bytes <= 0:
            return
        free = self.free_bytes()
        if free < floor_bytes:
            raise InsufficientStorageError(
                f"the server is low on disk space ({_format_bytes(free)} free, "
                f"{_format_bytes(floor_bytes)} required to accept new jobs); try again later"
            )

    # -- one manager per data directory ----------------------------------------------------

    def acquire_lock(self) -> None:
        """Take an exclusive lock on the data directory (``RuntimeError`` if another holder has it).

        Two managers on one directory would each "recover" the other's running jobs.
        No-op where ``fcntl`` is missing (not POSIX).
        """
        if self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(
                f"another job manager is already using {self.data_dir} (one service process per data "
                "directory: run the API with a single worker process, or give each its own data directory)"
            ) from None
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None
