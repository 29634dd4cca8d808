"""The job-file storage interface (what the job manager needs of a place to keep files)."""

from __future__ import annotations

from collections.abc import Collection, Container, Iterator
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import quote


def content_disposition(disposition: str, filename: str) -> str:
    """A Content-Disposition value as Starlette's FileResponse writes it (RFC 5987 for non-ASCII names)."""
    quoted = quote(filename)
    if quoted != filename:
        return f"{disposition}; filename*=utf-8''{quoted}"
    return f'{disposition}; filename="{filename}"'


@runtime_checkable
class StoredObject(Protocol):
    """One stored file, opened for reading (a download)."""

    size: int
    etag: str | None
    last_modified: datetime | None
    local_path: Path | None  # set when the file is on this machine's disk: serve it directly

    def iter_range(self, start: int, stop: int) -> Iterator[bytes]:
        """Bytes ``start`` up to (not including) ``stop``, in chunks, streamed from the store."""
        ...

    def redirect_url(self, filename: str, disposition: str = "attachment",
                     media_type: str | None = None) -> str | None:
        """A URL the client may fetch the object from itself (presigned), or None."""
        ...


@runtime_checkable
class JobStorage(Protocol):
    """A job's files, addressed by (job id, plain file name); safe to use from many threads.

    * ``is_local``: True when the storage *is* the local job directories (the data dir):
      the pipeline's scratch directory already holds the files, nothing is staged or uploaded.
    * ``put(job_id, name, src)``: store the local file ``src`` (streamed; atomic: the stored
      file appears whole or not at all).
    * ``fetch(job_id, name, dest)``: copy the stored file to the local path ``dest`` (atomic).
    * ``exists(job_id, name)``; ``open(job_id, name)`` -> :class:`StoredObject`
      (``FileNotFoundError`` if absent).
    * ``delete(job_id)``: remove every file of the job; nothing happens if there is none.
    * ``sweep_orphans(known_ids, active_ids, min_age_s)``: remove what belongs to no job
      (ids not in ``known_ids``) and leftovers of interrupted writes (of jobs not in
      ``active_ids``), older than ``min_age_s``; returns how many entries went.
    * ``close()``.
    """

    is_local: bool
    description: str

    def put(self, job_id: str, name: str, src: Path) -> None: ...

    def fetch(self, job_id: str, name: str, dest: Path) -> None: ...

    def exists(self, job_id: str, name: str) -> bool: ...

    def open(self, job_id: str, name: str) -> StoredObject: ...

    def delete(self, job_id: str) -> None: ...

    def sweep_orphans(self, known_ids: Container[str], active_ids: Collection[str], min_age_s: float) -> int: ...

    def close(self) -> None: ...
