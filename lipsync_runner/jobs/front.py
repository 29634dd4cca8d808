"""The job manager's front, as the API and the executor use it: admission into the store, queries,
waits, cancel and cleanup.

:class:`Manager` is that front as a protocol (the REST tests use an in-memory stand-in);
:class:`JobFront` implements it over the :class:`SharedState` of a
:class:`~lipsync_runner.jobs.manager.JobManager`, which delegates to it. Nothing here runs a job:
a submitted job waits in the store until a worker (on any replica) claims it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Final, Protocol

from lipsync_runner.errors import JobNotFinishedError, JobNotFoundError, QueueFullError
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus, new_job_id
from lipsync_runner.jobs.shared import CANCELLED_MESSAGE, LOG_NAME, SharedState
from lipsync_runner.params import JobParams, is_job_id
from lipsync_runner.storage.base import StoredObject
from lipsync_runner.storage.job_files import OUTPUT_NAME, is_plain_name

log = logging.getLogger(LOG_NAME)  # the manager's logger: one for all its parts

WAIT_POLL_S = 1.0  # waiters re-read the store at least this often (a change made by another process)
DEFAULT_JOB_SECONDS = 60.0  # assumed job duration for Retry-After before any job has finished


class Unsaid(Enum):
    """The type of :data:`UNSAID`."""

    owner = "unsaid"


#: ``new_upload()``'s caller did not say whose upload it is: only the global limit applies. Not
#: None, which is an owner (jobs not scoped): counting unknown uploads as None's would refuse a
#: scoped deployment's uploads once enough of them were in flight at once.
UNSAID: Final = Unsaid.owner


class Manager(Protocol):
    """The job manager as the API uses it (lipsync_runner.jobs.JobManager)."""

    def new_upload(self, owner: str | None | Unsaid = UNSAID) -> tuple[str, Path]: ...
    def discard_upload(self, job_id: str) -> None: ...
    def submit(self, job_id: str, *, video_file: str, audio_file: str | None, video_filename: str,
               audio_filename: str | None, params: JobParams, owner: str | None = None, **extra: Any) -> JobRecord: ...
    def get(self, job_id: str, owner: str | None = None) -> JobRecord: ...
    def list(self, owner: str | None = None, limit: int = 100, **kind: Any) -> list[JobRecord]: ...
    def output_path(self, job_id: str, owner: str | None = None) -> Path: ...
    def open_output(self, job_id: str, owner: str | None = None) -> StoredObject: ...
    def input_path(self, job_id: str, name: str, owner: str | None = None) -> Path: ...
    def open_file(self, job_id: str, name: str, owner: str | None = None) -> StoredObject: ...
    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord: ...
    def cleanup(self, job_id: str, owner: str | None = None) -> None: ...
    async def wait_async(self, job_id: str, timeout: float | None = None) -> JobRecord: ...
    def counts(self) -> dict[str, int]: ...
    def check_free_space(self) -> None: ...
    def extend_expiry(self, job_id: str) -> None: ...


class JobFront:
    """Admission, queries, waits, cancel and cleanup over the store (see :class:`Manager`)."""

    def __init__(self, shared: SharedState, *, workers: int, max_queued: int, free_space_floor_bytes: int,
                 max_queued_per_owner: int | None = None) -> None:
        self._s = shared
        self.workers = workers  # only to spread a job's time over them in Retry-After
        self.max_queued = max_queued  # counted over every replica: the last guard
        self.max_queued_per_owner = max_queued_per_owner  # one owner's share of it (None: no share)
        self.free_space_floor_bytes = free_space_floor_bytes

    # -- uploads and submission ------------------------------------------------------------

    def new_upload(self, owner: str | None | Unsaid = UNSAID) -> tuple[str, Path]:
        """A new job id and its (created, empty) local directory for the API to stream ``owner``'s
        uploads into.

        Raises InsufficientStorageError below the free-space floor, and QueueFullError when
        ``owner`` has ``max_queued_per_owner`` jobs waiting (that owner only: others are still
        admitted) or ``max_queued`` jobs are already waiting in all, counted over every replica
        (uploads in progress count as waiting). ``owner`` None is one owner (jobs not scoped);
        :data:`UNSAID`: only the global limit.
        """
        s = self._s
        s.files.check_free_space(self.free_space_floor_bytes)
        job_id = new_job_id()
        who, share = (None, None) if isinstance(owner, Unsaid) else (owner, self.max_queued_per_owner)
        with s.files_lock:
            got = s.store.reserve_upload(job_id, s.replica_id, self.max_queued, s.lease_s, owner=who,
                                         max_owner_waiting=share)
            if not got.admitted:
                retry = self._retry_after_s()
                if share is not None and got.owners_waiting >= share:
                    raise QueueFullError(
                        f"too many of your jobs are waiting: {got.owners_waiting} queued or uploading, the limit of "
                        f"one owner ({share}, LIP_SYNC_MAX_QUEUED_JOBS_PER_OWNER); try again in about {retry} s",
                        retry_after_s=retry)
                raise QueueFullError(f"the server is busy ({got.waiting} jobs waiting); try again in about {retry} s",
                                     retry_after_s=retry)
            s.uploads[job_id] = time.monotonic()
            try:
                directory = s.files.job_dir(job_id, create=True)
            except BaseException:
                s.uploads.pop(job_id, None)
                s.store.release_upload(job_id)
                raise
        return job_id, directory

    def check_free_space(self) -> None:
        """InsufficientStorageError (507) below the free-space floor (re-checked while uploads stream)."""
        self._s.files.check_free_space(self.free_space_floor_bytes)

    def _retry_after_s(self) -> int:
        """About when a queue slot frees up: one job's time spread over the workers."""
        durations = self._s.durations
        mean = sum(durations) / len(durations) if durations else DEFAULT_JOB_SECONDS
        return int(min(600, max(1, math.ceil(mean / self.workers))))

    def discard_upload(self, job_id: str) -> None:
        """Remove an upload that will not be submitted (failed validation): its directory, its queue
        slot and anything it stored."""
        s = self._s
        directory = s.files.job_dir(job_id)  # JobNotFoundError for a malformed id
        with s.files_lock:
            s.uploads.pop(job_id, None)
            s.store.release_upload(job_id)
            if s.store.get(job_id) is not None:
                log.warning("discard_upload(%s): the job was already submitted; leaving it", job_id)
                return
            s.files.remove_orphan(directory)
        if not s.storage.is_local:
            s.storage.delete(job_id)  # inputs a failed submit had stored already

    def submit(
        self,
        job_id: str,
        *,
        video_file: str,
        audio_file: str | None,
        video_filename: str,
        audio_filename: str | None,
        params: JobParams,
        owner: str | None = None,
        media: dict | None = None,
        kind: JobKind = JobKind.job,
    ) -> JobRecord:
        """Store the uploaded inputs, then record the job as queued (any replica may then run it).

        ``video_file``/``audio_file`` are plain names of files already in the job's
        directory (``ValueError`` otherwise); the ``*_filename`` are the user's, for display;
        ``media``: what admission learnt of the inputs (durations, size, fps). ``kind``: an
        avatar is queued and run like a job (the executor tells them apart) and has no audio.
        """
        s = self._s
        if (audio_file is None) != (kind is JobKind.avatar):
            raise ValueError("a job has an audio file, an avatar none")
        directory = s.files.job_dir(job_id)
        for name in (video_file, audio_file):
            if name is None:
                continue
            if not is_plain_name(name):
                raise ValueError(f"not a plain file name: {name!r}")
            if not (directory / name).is_file():
                raise ValueError(f"job {job_id} has no uploaded file {name!r}")
        record = JobRecord(
            job_id=job_id,
            params=params,
            owner=owner,
            video_filename=video_filename,
            audio_filename=audio_filename,
            video_file=video_file,
            audio_file=audio_file,
            media=media,
            kind=kind,
        )
        # the inputs first, then what else admission left there (the thumbnail): a bucket gets
        # each as a streamed multipart upload
        extras = sorted(p.name for p in directory.iterdir() if is_plain_name(p.name) and p.is_file())
        for name in dict.fromkeys(n for n in (video_file, audio_file, *extras) if n is not None):
            s.storage.put(job_id, name, directory / name)
        with s.files_lock:
            s.store.create(record)  # the job exists (and its upload reservation ends) only now
            s.uploads.pop(job_id, None)
        if not s.storage.is_local:
            with s.lock:  # a worker here that claimed the job already works in this directory: keep it
                if job_id not in s.running:
                    s.files.remove(job_id)  # the local copy was only the upload buffer
        s.wake_workers()
        log.info("job %s: queued", job_id)
        return record

    def extend_expiry(self, job_id: str) -> None:
        """Keep a finished record (an avatar just used) for another ``retention_s`` from now."""
        retention_s = self._s.retention_s

        def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
            until = now + timedelta(seconds=retention_s)
            if current.status.finished and (current.expires_at is None or current.expires_at < until):
                return {"expires_at": until}
            return None

        try:
            self._s.store.modify(job_id, change)
        except JobNotFoundError:
            pass

    # -- queries ---------------------------------------------------------------------------

    def _overlay(self, rec: JobRecord) -> JobRecord:
        """The freshest progress of a job running here (the store is written throttled), and
        'cancelling' for a job asked to stop (here or on another replica)."""
        if rec.status is not JobStatus.processing:
            return rec
        run = self._s.running.get(rec.job_id)
        if run is None:
            return rec.model_copy(update={"stage": "cancelling"}) if rec.cancel_requested else rec
        stage = "cancelling" if run.cancel.is_set() or rec.cancel_requested else run.stage
        return rec.model_copy(update={"stage": stage, "progress": run.progress})

    def _lookup(self, job_id: str, owner: str | None) -> JobRecord:
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        rec = self._s.store.get(job_id)
        if rec is None or (owner is not None and rec.owner != owner):
            raise JobNotFoundError("no such job")
        return rec

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """The job's record; JobNotFoundError if unknown, malformed, or (with ``owner``) someone else's."""
        return self._overlay(self._lookup(job_id, owner))

    def list(self, owner: str | None = None, limit: int = 100, kind: JobKind | None = JobKind.job) -> list[JobRecord]:
        """Newest first; ``owner=None`` lists everyone's; jobs only unless ``kind`` says otherwise."""
        return [self._overlay(r) for r in self._s.store.list(owner=owner, limit=limit, kind=kind)]

    def counts(self) -> dict[str, int]:
        """Jobs per status, e.g. ``{"queued": 3, "processing": 2, "completed": 10, ...}`` (all replicas)."""
        return self._s.store.count_by_status()

    def open_output(self, job_id: str, owner: str | None = None) -> StoredObject:
        """The stored result of a completed job, for streaming (``storage.object_response``);
        JobNotFinishedError (409) otherwise."""
        rec = self._overlay(self._lookup(job_id, owner))
        if rec.status is not JobStatus.completed:
            raise JobNotFinishedError(_not_downloadable(rec))
        try:
            return self._s.storage.open(job_id, rec.output_file or "")
        except (FileNotFoundError, ValueError):
            raise JobNotFinishedError("the job's output file is no longer available") from None

    def output_path(self, job_id: str, owner: str | None = None) -> Path:
        """The result of a completed job as a local file; JobNotFinishedError (409) otherwise.

        With a bucket, the object is copied to this replica's scratch first (the local
        orphan sweep removes the copy later); prefer :meth:`open_output`, which streams.
        """
        obj = self.open_output(job_id, owner)
        if obj.local_path is not None:
            return obj.local_path
        rec = self._lookup(job_id, owner)
        try:
            return self._local_copy(job_id, rec.output_file or OUTPUT_NAME, obj)
        except FileNotFoundError:
            raise JobNotFinishedError("the job's output file is no longer available") from None

    def open_file(self, job_id: str, name: str, owner: str | None = None) -> StoredObject:
        """A file admission stored with the job (an input, its thumbnail), for streaming
        (``storage.object_response``); JobNotFoundError if absent."""
        self._lookup(job_id, owner)
        try:
            return self._s.storage.open(job_id, name)
        except (FileNotFoundError, ValueError):
            raise JobNotFoundError("no such job") from None

    def input_path(self, job_id: str, name: str, owner: str | None = None) -> Path:
        """:meth:`open_file` as a local file (with a bucket: copied to this replica's scratch first,
        like :meth:`output_path`)."""
        obj = self.open_file(job_id, name, owner)
        return obj.local_path if obj.local_path is not None else self._local_copy(job_id, name, obj)

    def _local_copy(self, job_id: str, name: str, obj: StoredObject) -> Path:
        """A stored file in this replica's scratch (the local orphan sweep removes it later)."""
        dest = self._s.files.path(job_id, name)
        if not (dest.is_file() and dest.stat().st_size == obj.size):
            dest.parent.mkdir(exist_ok=True)
            self._s.storage.fetch(job_id, name, dest)
        return dest

    # -- waits -----------------------------------------------------------------------------

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job is finished (or ``timeout`` passes); returns its record either way."""
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        deadline = None if timeout is None else time.monotonic() + timeout
        changed = self._s.changed
        with changed:
            while True:
                rec = self._lookup(job_id, None)
                if rec.status.finished:
                    return rec
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return self._overlay(rec)
                changed.wait(WAIT_POLL_S if remaining is None else min(WAIT_POLL_S, remaining))

    async def wait_async(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """:meth:`wait` for the event loop: no thread is held while waiting."""
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        s = self._s
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with s.lock:
            s.async_waiters.setdefault(job_id, set()).add(entry)
        try:
            deadline = None if timeout is None else loop.time() + timeout
            while True:
                event.clear()
                rec = await asyncio.to_thread(self.get, job_id)
                if rec.status.finished:
                    return rec
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return rec
                pause = WAIT_POLL_S if remaining is None else min(WAIT_POLL_S, remaining)
                try:
                    await asyncio.wait_for(event.wait(), pause)
                except asyncio.TimeoutError:
                    pass
        finally:
            with s.lock:
                waiters = s.async_waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del s.async_waiters[job_id]

    # -- cancel and cleanup ----------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """Queued: cancelled now. Processing: the worker holding it, on whichever replica, is told
        to stop (stage 'cancelling' until it does, then 'cancelled'). Finished: returned unchanged."""
        s = self._s
        self._lookup(job_id, owner)

        def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
            if current.status.finished:
                return None
            nobody_runs_it = current.status is JobStatus.queued or (
                current.job_id not in s.running
                and (not s.store.shared  # this process owns the store: it would be running here
                     or current.lease_expires_at is None or current.lease_expires_at < now))
            if nobody_runs_it:
                return s.finished_fields(JobStatus.cancelled, now, error=CANCELLED_MESSAGE)
            return None if current.cancel_requested else {"cancel_requested": True}

        before = s.store.get(job_id)
        rec = s.store.modify(job_id, change)
        run = s.running.get(job_id)
        if run is not None and not run.cancel.is_set():
            run.cancel.set()
        log.info("job %s: %s", job_id, "cancelled" if rec.status is JobStatus.cancelled else "cancel requested")
        s.notify(job_id)
        if rec.status is JobStatus.cancelled and before is not None and not before.status.finished:
            s.emit(job_id, JobStatus.cancelled.value)  # cancelled now (a running job's comes when it stops)
        return self._overlay(rec)

    def cleanup(self, job_id: str, owner: str | None = None) -> None:
        """Forget the job: cancel it if needed, delete its record and its files.

        The record goes at once (the job is 404 from now on), then the stored files. A job
        running here or on another replica stops a chunk (or a heartbeat) later and its
        worker removes what it still had; if that process dies first, the sweeper does.
        """
        s = self._s
        self._lookup(job_id, owner)
        with s.changed:
            rec = self._lookup(job_id, owner)
            s.store.delete(job_id)
            run = s.running.get(job_id)
            if run is not None and rec.status.finished:
                run = None  # its worker wrote the end and stores nothing more: the files go now, here
            if run is not None:
                run.doomed = True
                run.cancel.set()
        s.notify(job_id)
        if run is None:
            s.remove_files(job_id)
        s.removed(job_id)
        log.info("job %s: removed%s", job_id, " (its worker is stopping)" if run is not None else "")
        s.emit(job_id, "removed")


def _not_downloadable(rec: JobRecord) -> str:
    if rec.status is JobStatus.queued:
        return "the job is queued and has no result yet"
    if rec.status is JobStatus.processing:
        return f"the job is still processing ({rec.stage}, {rec.progress:.0%}); no result yet"
    if rec.status is JobStatus.failed:
        return f"the job failed and has no result: {rec.error or 'unknown error'}"
    return "the job was cancelled and has no result"
