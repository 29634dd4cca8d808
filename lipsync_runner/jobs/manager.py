"""Background lip-sync jobs: admission, the shared queue, leased workers, cancel, recovery, expiry.

The API layer owns one :class:`JobManager` per process. A request goes

    new_upload() -> (job id, empty local directory)   # admission: free space, queue length
    ... the API streams and validates the uploads into that directory ...
    submit(job id, file names, params, media=...)     # the directory's files -> storage, then 'queued'
    get / list / wait_async / open_output / output_path / open_file / input_path / cancel / cleanup

**The store is the queue.** Workers ``claim`` the oldest queued job from the
:class:`JobStore`; with PostgreSQL every replica of the API claims from the same table, so
any replica may run any job. A claimed job carries a lease that a heartbeat thread renews
every few seconds; the same heartbeat reads back cancel requests made on other replicas and
notices jobs that were removed. When a process dies its leases run out, and any replica
puts those jobs back in the queue (or fails them once they have used ``max_attempts``).

**Files.** The upload directory and the workers' scratch are local (:class:`JobFiles`);
the :class:`~lipsync_runner.storage.JobStorage` keeps inputs and outputs: in the data
directory itself (the embedded default, nothing to copy) or in a bucket. ``submit`` stores
the inputs before the job becomes visible as queued; a worker stages them into scratch,
stores the output and only then records the job 'completed', then drops its scratch.

**One process per SQLite store.** An unshared store (SQLite) is locked to the process
with the data-directory lock: at start, every 'processing' record belongs to a dead
process and is recovered at once. A shared store (PostgreSQL) takes no lock: leases tell
live jobs from dead ones, and an advisory lock makes the retention sweep run on one replica
at a time. The lock (and the store) are released last, after the last worker has finished.

``on_event(job_id, event)``, when given, is told what happens to jobs: ``started``,
``progress`` (when the progress is written, at most every PROGRESS_WRITE_INTERVAL_S),
``completed``, ``failed``, ``cancelled`` and ``removed`` (cleanup, expiry). It is called
after the store says so, outside the manager's locks, on whichever thread (of this replica)
made the change; an exception in it is logged and ignored. Webhooks, usage and job logs hang off it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from lipsync_runner.errors import (
    JobCancelledError,
    JobNotFinishedError,
    JobNotFoundError,
    LipSyncError,
    QueueFullError,
)
from lipsync_runner.jobs.front import Manager
from lipsync_runner.storage.job_files import OUTPUT_NAME, JobFiles, is_plain_name
from lipsync_runner.jobs.records import JobKind, JobParams, JobRecord, JobStatus, new_job_id, utcnow
from lipsync_runner.params import is_job_id
from lipsync_runner.jobs.store import SQLITE_NAME, JobStore, SQLiteJobStore

if TYPE_CHECKING:
    from lipsync_runner.storage import JobStorage, StoredObject

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error while processing the job"
CANCELLED_MESSAGE = "the job was cancelled"
MISSING_INPUTS = "the job's input files are missing"
DB_NAME = SQLITE_NAME
PROGRESS_WRITE_INTERVAL_S = 0.5  # at most one progress write per job per interval (plus one per stage change)
UPLOAD_TTL_S = 3600.0  # an upload directory not submitted within this is abandoned (then swept)
WAIT_POLL_S = 1.0  # waiters re-read the store at least this often (a change made by another process)
DEFAULT_JOB_SECONDS = 60.0  # assumed job duration for Retry-After before any job has finished
FINAL_WRITE_ATTEMPTS = 5  # the record of a finished job is written this many times before giving up


def default_replica_id() -> str:
    """Who holds a lease: the pod's host name, the process, and a random part (never reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class JobContext:
    """What an executor gets: the record, the job's (local) directory and two callbacks."""

    job: JobRecord
    work_dir: Path
    progress: Callable[[str, float], None]  # (stage, overall fraction 0..1); cheap, throttled by the manager
    should_cancel: Callable[[], bool]  # poll it; raise JobCancelledError when it says True
    jobs: Manager  # the job front, for the records a job refers to (its avatar)

    @property
    def video_path(self) -> Path:
        return self.work_dir / self.job.video_file

    @property
    def audio_path(self) -> Path:
        return self.work_dir / self.job.audio_file

    @property
    def output_path(self) -> Path:
        """Where the result should go (write atomically: temp file + rename)."""
        return self.work_dir / OUTPUT_NAME


@dataclass
class JobOutcome:
    output_file: str  # a file name in the job's directory (or an absolute path inside it)
    frames: int
    timings: dict[str, float] = field(default_factory=dict)
    cache_hit: bool | None = None  # avatar cache: hit, miss, or not used
    media: dict | None = None  # what the worker learnt of inputs admission did not see (fetched by URL)
    faces: dict | None = None  # the face tracks found and who was dubbed (faces.FaceTracks.summary)
    # other files the worker wrote into the job's directory that must outlive its scratch (inputs it
    # fetched, their updated references, a thumbnail): stored, in this order, before the output
    keep: list[str] = field(default_factory=list)


Executor = Callable[[JobContext], JobOutcome]
"""Runs the pipeline; raises LipSyncError (failure shown to the user) or any Exception (internal)."""

EventListener = Callable[[str, str], None]
"""``(job_id, event)``: started, progress, completed, failed, cancelled, removed."""


@dataclass
class _Running:
    job_id: str
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    doomed: bool = False  # its record was removed (cleanup, here or elsewhere): files go when the worker lets go
    lost: bool = False  # its lease went to another worker: this run's outcome must not be recorded
    stage: str = "starting"
    progress: float = 0.0
    written_stage: str = ""
    written_at: float = 0.0


class _Known:
    """``in`` answers whether a job id still belongs to something (for orphan detection)."""

    def __init__(self, manager: JobManager, reserved: set[str]) -> None:
        self._m, self._reserved = manager, reserved

    def __contains__(self, job_id: object) -> bool:
        m = self._m
        if job_id in m._uploads or job_id in m._running or job_id in self._reserved:
            return True
        return isinstance(job_id, str) and m._store.get(job_id) is not None


class JobManager:
    def __init__(
        self,
        store: JobStore,
        files: JobFiles,
        execute: Executor,
        *,
        storage: JobStorage | None = None,
        workers: int = 2,
        retention_s: float = 86400,
        max_attempts: int = 2,
        sweep_interval_s: float = 300,
        max_queued: int = 100,
        free_space_floor_bytes: int = 0,
        debug: bool = False,
        orphan_grace_s: float = 600,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        replica_id: str | None = None,
        on_removed: Callable[[str], None] | None = None,
        on_event: EventListener | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if lease_s <= 0 or poll_s <= 0:
            raise ValueError("lease_s and poll_s must be positive")
        if storage is None:
            from lipsync_runner.storage.local import LocalStorage

            storage = LocalStorage(files)
        self._store = store
        self._files = files
        self._storage = storage
        self._execute = execute
        self.workers = int(workers)
        self.retention_s = float(retention_s)
        self.max_attempts = int(max_attempts)
        self.sweep_interval_s = float(sweep_interval_s)
        self.max_queued = int(max_queued)
        self.free_space_floor_bytes = int(free_space_floor_bytes)
        self.debug = bool(debug)
        self.orphan_grace_s = float(orphan_grace_s)  # periodic sweeps leave younger orphans alone
        self.lease_s = float(lease_s)
        # renewals (and cross-replica cancel checks) happen this often: a lease survives two missed beats
        self.heartbeat_s = min(2.0, self.lease_s / 3)
        self.poll_s = float(poll_s)  # idle workers look at the shared queue this often
        self.replica_id = replica_id or default_replica_id()
        self._on_removed = on_removed  # (job id): a job is gone for good (cleanup, expiry): e.g. its avatar refs
        self.on_event = on_event

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)  # job state changes (waiters)
        self._work = threading.Condition(self._lock)  # something was queued here (idle workers)
        self._files_lock = threading.Lock()  # upload <-> submit <-> orphan removal
        self._submits = 0
        self._running: dict[str, _Running] = {}
        self._uploads: dict[str, float] = {}  # job id -> monotonic time of new_upload
        self._async_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._durations: deque[float] = deque(maxlen=20)
        self._generation = 0  # bumped by stop(): workers of an older generation exit
        self._active = False
        self._closing = False
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._heartbeat_thread: threading.Thread | None = None
        self._beat_now = threading.Event()  # wakes the heartbeat early (stop: it may exit)
        self._stop_event = threading.Event()

    @classmethod
    def from_data_dir(cls, data_dir: Path | str, execute: Executor, **kwargs: object) -> JobManager:
        """A manager with a SQLite store (``<data_dir>/jobs.sqlite3``) and files under ``<data_dir>/jobs``."""
        data_dir = Path(data_dir)
        files = JobFiles(data_dir)
        return cls(SQLiteJobStore(data_dir / DB_NAME), files, execute, **kwargs)  # type: ignore[arg-type]

    @property
    def store(self) -> JobStore:
        return self._store

    @property
    def files(self) -> JobFiles:
        return self._files

    @property
    def storage(self) -> JobStorage:
        return self._storage

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, then start the workers, the heartbeat and the sweeper
        (idempotent)."""
        with self._lock:
            if self._active:
                return
            if self._closed:
                raise RuntimeError("the job manager is closed")
            if not self._store.shared:
                self._files.acquire_lock()
            self._closing = False
            self._recover()
            self._active = True
            self._stop_event = threading.Event()
            generation = self._generation
            self._threads = [
                threading.Thread(target=self._worker, args=(generation,), name=f"job-worker-{i}", daemon=True)
                for i in range(self.workers)
            ]
            self._threads.append(
                threading.Thread(target=self._sweeper, args=(self._stop_event,), name="job-sweeper", daemon=True)
            )
            if self._heartbeat_thread is None:  # else still beating for jobs that run on after a stop()
                self._heartbeat_thread = threading.Thread(target=self._heartbeat, name="job-heartbeat", daemon=True)
                self._threads.append(self._heartbeat_thread)
            for t in self._threads:
                t.start()
        log.info("job manager %s started: %d worker(s); jobs in %s, files in %s", self.replica_id, self.workers,
                 type(self._store).__name__, self._storage.description)

    def stop(self, timeout: float = 10) -> None:
        """Stop taking jobs and join the threads (for up to ``timeout`` seconds).

        Running jobs are not cancelled: they keep their leases while they run here. A job
        still running when the process exits stays 'processing' until its lease runs out;
        then any replica (or the next start, for SQLite) queues it again.
        """
        with self._cond:
            if not self._active:
                return
            self._active = False
            self._generation += 1
            self._stop_event.set()
            self._cond.notify_all()
            self._work.notify_all()
            self._beat_now.set()
            threads = [t for t in self._threads if t is not self._heartbeat_thread]
            self._threads = []
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        still = [t.name for t in threads if t.is_alive()]
        if still:
            log.warning("job manager stopped with %d job(s) still running; they will finish or be "
                        "re-queued when their lease runs out", len(still))
        self._release_if_idle()

    def close(self, timeout: float = 10) -> None:
        """``stop``, then close the store and release the data directory: at once if nothing runs,
        else when the last running job has finished (never under a live job)."""
        with self._lock:
            self._closing = True
        self.stop(timeout)
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        """With no job running here any more: close what close() asked for, the directory lock last."""
        with self._lock:
            if self._active or self._running:
                return
            closing = self._closing and not self._closed
            self._closed = self._closed or closing
            heartbeat = self._heartbeat_thread
            self._beat_now.set()
        if closing:
            if heartbeat is not None and heartbeat is not threading.current_thread():
                heartbeat.join(self.heartbeat_s + 30)  # its last beat must not meet a closed store
            for what, closer in (("store", self._store.close), ("storage", self._storage.close)):
                try:
                    closer()
                except Exception:
                    log.exception("closing the job %s failed", what)
        with self._lock:
            if not self._active and not self._running:
                self._files.release_lock()

    def _recover(self) -> None:
        """At start: re-queue interrupted jobs (all of them, when this process owns the store; else those
        whose lease ran out); fail those out of attempts or inputs; drop orphans."""
        exclusive = not self._store.shared
        self._requeue_lapsed(everything=exclusive)
        if exclusive:  # queued jobs of a dead process: their inputs must still be there
            for rec in self._store.list(statuses={JobStatus.queued}, limit=None):
                if not self._inputs_present(rec):
                    self._store.update(rec.job_id, **self._finished_fields(JobStatus.failed, utcnow(),
                                                                           error=MISSING_INPUTS))
                    self._emit(rec.job_id, JobStatus.failed.value)
        # nothing runs here yet: local leftovers can go at once; shared storage keeps its grace
        self._remove_orphans(grace_s=0.0 if exclusive else self.orphan_grace_s, local_grace_s=0.0)

    def _requeue_lapsed(self, everything: bool = False) -> None:
        """'processing' jobs nobody holds any more: back to the queue, or failed when out of attempts."""
        candidates = (self._store.list(statuses={JobStatus.processing}, limit=None) if everything
                      else self._store.lapsed())
        for rec in candidates:
            if rec.job_id in self._running:
                continue
            inputs_ok = self._inputs_present(rec)

            def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
                if current.status is not JobStatus.processing or current.job_id in self._running:
                    return None
                lease = current.lease_expires_at
                alive = lease is not None and lease >= now
                if alive and (not everything or current.lease_owner == self.replica_id):
                    return None  # renewed meanwhile (or just claimed by a worker of this process)
                if current.cancel_requested:
                    return self._finished_fields(JobStatus.cancelled, now, error=CANCELLED_MESSAGE)
                if current.attempts < self.max_attempts and inputs_ok:
                    return dict(status=JobStatus.queued, stage="queued", progress=0.0, lease_owner=None,
                                lease_expires_at=None)
                reason = (f"the server stopped while the job was running (attempt {current.attempts} of "
                          f"{self.max_attempts})")
                if not inputs_ok:
                    reason += "; its input files are gone"
                return self._finished_fields(JobStatus.failed, now, error=reason)

            try:
                after = self._store.modify(rec.job_id, change)
            except JobNotFoundError:
                continue
            if after.status is JobStatus.queued:
                log.info("job %s: re-queued after an interrupted attempt %d", rec.job_id, after.attempts)
                self._wake_workers()
            elif after.status.finished:
                log.warning("job %s: %s", rec.job_id, after.error)
            self._notify(rec.job_id)
            if after.status.finished and not rec.status.finished:
                self._emit(rec.job_id, after.status.value)

    def _inputs_present(self, rec: JobRecord) -> bool:
        try:
            return all(self._storage.exists(rec.job_id, name)
                       for name in (rec.video_file, rec.audio_file) if name is not None)  # an avatar: no audio
        except (ValueError, LipSyncError):
            return False

    # -- uploads and submission ------------------------------------------------------------

    def new_upload(self) -> tuple[str, Path]:
        """A new job id and its (created, empty) local directory for the API to stream uploads into.

        Raises InsufficientStorageError below the free-space floor and QueueFullError when
        ``max_queued`` jobs are already waiting, counted over every replica (uploads in
        progress count as waiting).
        """
        self._files.check_free_space(self.free_space_floor_bytes)
        job_id = new_job_id()
        with self._files_lock:
            admitted, waiting = self._store.reserve_upload(job_id, self.replica_id, self.max_queued, self.lease_s)
            if not admitted:
                retry = self._retry_after_s()
                raise QueueFullError(
                    f"the server is busy ({waiting} jobs waiting); try again in about {retry} s", retry_after_s=retry
                )
            self._uploads[job_id] = time.monotonic()
            try:
                directory = self._files.job_dir(job_id, create=True)
            except BaseException:
                self._uploads.pop(job_id, None)
                self._store.release_upload(job_id)
                raise
        return job_id, directory

    def check_free_space(self) -> None:
        """InsufficientStorageError (507) below the free-space floor (re-checked while uploads stream)."""
        self._files.check_free_space(self.free_space_floor_bytes)

    def _retry_after_s(self) -> int:
        """About when a queue slot frees up: one job's time spread over the workers."""
        mean = sum(self._durations) / len(self._durations) if self._durations else DEFAULT_JOB_SECONDS
        return int(min(600, max(1, math.ceil(mean / self.workers))))

    def discard_upload(self, job_id: str) -> None:
        """Remove an upload that will not be submitted (failed validation): its directory, its queue
        slot and anything it stored."""
        directory = self._files.job_dir(job_id)  # JobNotFoundError for a malformed id
        with self._files_lock:
            self._uploads.pop(job_id, None)
            self._store.release_upload(job_id)
            if self._store.get(job_id) is not None:
                log.warning("discard_upload(%s): the job was already submitted; leaving it", job_id)
                return
            self._files.remove_orphan(directory)
        if not self._storage.is_local:
            self._storage.delete(job_id)  # inputs a failed submit had stored already

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
        if (audio_file is None) != (kind is JobKind.avatar):
            raise ValueError("a job has an audio file, an avatar none")
        directory = self._files.job_dir(job_id)
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
            self._storage.put(job_id, name, directory / name)
        with self._files_lock:
            self._store.create(record)  # the job exists (and its upload reservation ends) only now
            self._uploads.pop(job_id, None)
        if not self._storage.is_local:
            with self._lock:  # a worker here that claimed the job already works in this directory: keep it
                if job_id not in self._running:
                    self._files.remove(job_id)  # the local copy was only the upload buffer
        self._wake_workers()
        log.info("job %s: queued", job_id)
        return record

    def _wake_workers(self) -> None:
        with self._work:
            self._submits += 1
            self._work.notify()

    def extend_expiry(self, job_id: str) -> None:
        """Keep a finished record (an avatar just used) for another ``retention_s`` from now."""
        def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
            until = now + timedelta(seconds=self.retention_s)
            if current.status.finished and (current.expires_at is None or current.expires_at < until):
                return {"expires_at": until}
            return None

        try:
            self._store.modify(job_id, change)
        except JobNotFoundError:
            pass

    # -- queries ---------------------------------------------------------------------------

    def _overlay(self, rec: JobRecord) -> JobRecord:
        """The freshest progress of a job running here (the store is written throttled), and
        'cancelling' for a job asked to stop (here or on another replica)."""
        if rec.status is not JobStatus.processing:
            return rec
        run = self._running.get(rec.job_id)
        if run is None:
            return rec.model_copy(update={"stage": "cancelling"}) if rec.cancel_requested else rec
        stage = "cancelling" if run.cancel.is_set() or rec.cancel_requested else run.stage
        return rec.model_copy(update={"stage": stage, "progress": run.progress})

    def _lookup(self, job_id: str, owner: str | None) -> JobRecord:
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        rec = self._store.get(job_id)
        if rec is None or (owner is not None and rec.owner != owner):
            raise JobNotFoundError("no such job")
        return rec

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """The job's record; JobNotFoundError if unknown, malformed, or (with ``owner``) someone else's."""
        return self._overlay(self._lookup(job_id, owner))

    def list(self, owner: str | None = None, limit: int = 100, kind: JobKind | None = JobKind.job) -> list[JobRecord]:
        """Newest first; ``owner=None`` lists everyone's; jobs only unless ``kind`` says otherwise."""
        return [self._overlay(r) for r in self._store.list(owner=owner, limit=limit, kind=kind)]

    def counts(self) -> dict[str, int]:
        """Jobs per status, e.g. ``{"queued": 3, "processing": 2, "completed": 10, ...}`` (all replicas)."""
        return self._store.count_by_status()

    def open_output(self, job_id: str, owner: str | None = None) -> StoredObject:
        """The stored result of a completed job, for streaming (``storage.object_response``);
        JobNotFinishedError (409) otherwise."""
        rec = self._overlay(self._lookup(job_id, owner))
        if rec.status is not JobStatus.completed:
            raise JobNotFinishedError(_not_downloadable(rec))
        try:
            return self._storage.open(job_id, rec.output_file or "")
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
            return self._storage.open(job_id, name)
        except (FileNotFoundError, ValueError):
            raise JobNotFoundError("no such job") from None

    def input_path(self, job_id: str, name: str, owner: str | None = None) -> Path:
        """:meth:`open_file` as a local file (with a bucket: copied to this replica's scratch first,
        like :meth:`output_path`)."""
        obj = self.open_file(job_id, name, owner)
        return obj.local_path if obj.local_path is not None else self._local_copy(job_id, name, obj)

    def _local_copy(self, job_id: str, name: str, obj: StoredObject) -> Path:
        """A stored file in this replica's scratch (the local orphan sweep removes it later)."""
        dest = self._files.path(job_id, name)
        if not (dest.is_file() and dest.stat().st_size == obj.size):
            dest.parent.mkdir(exist_ok=True)
            self._storage.fetch(job_id, name, dest)
        return dest

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """Block until the job is finished (or ``timeout`` passes); returns its record either way."""
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                rec = self._lookup(job_id, None)
                if rec.status.finished:
                    return rec
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return self._overlay(rec)
                self._cond.wait(WAIT_POLL_S if remaining is None else min(WAIT_POLL_S, remaining))

    async def wait_async(self, job_id: str, timeout: float | None = None) -> JobRecord:
        """:meth:`wait` for the event loop: no thread is held while waiting."""
        if not is_job_id(job_id):
            raise JobNotFoundError("no such job")
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        entry = (loop, event)
        with self._lock:
            self._async_waiters.setdefault(job_id, set()).add(entry)
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
            with self._lock:
                waiters = self._async_waiters.get(job_id)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._async_waiters[job_id]

    def _notify(self, job_id: str) -> None:
        """Wake waiters of this job (status change or deletion)."""
        with self._cond:
            self._cond.notify_all()
            for loop, event in list(self._async_waiters.get(job_id, ())):
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # that loop is closed
                    pass

    # -- cancel and cleanup ----------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """Queued: cancelled now. Processing: the worker holding it, on whichever replica, is told
        to stop (stage 'cancelling' until it does, then 'cancelled'). Finished: returned unchanged."""
        self._lookup(job_id, owner)

        def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
            if current.status.finished:
                return None
            nobody_runs_it = current.status is JobStatus.queued or (
                current.job_id not in self._running
                and (not self._store.shared  # this process owns the store: it would be running here
                     or current.lease_expires_at is None or current.lease_expires_at < now))
            if nobody_runs_it:
                return self._finished_fields(JobStatus.cancelled, now, error=CANCELLED_MESSAGE)
            return None if current.cancel_requested else {"cancel_requested": True}

        before = self._store.get(job_id)
        rec = self._store.modify(job_id, change)
        run = self._running.get(job_id)
        if run is not None and not run.cancel.is_set():
            run.cancel.set()
        log.info("job %s: %s", job_id, "cancelled" if rec.status is JobStatus.cancelled else "cancel requested")
        self._notify(job_id)
        if rec.status is JobStatus.cancelled and before is not None and not before.status.finished:
            self._emit(job_id, JobStatus.cancelled.value)  # cancelled now (a running job's comes when it stops)
        return self._overlay(rec)

    def cleanup(self, job_id: str, owner: str | None = None) -> None:
        """Forget the job: cancel it if needed, delete its record and its files.

        The record goes at once (the job is 404 from now on), then the stored files. A job
        running here or on another replica stops a chunk (or a heartbeat) later and its
        worker removes what it still had; if that process dies first, the sweeper does.
        """
        self._lookup(job_id, owner)
        with self._cond:
            self._lookup(job_id, owner)
            self._store.delete(job_id)
            run = self._running.get(job_id)
            if run is not None:
                run.doomed = True
                run.cancel.set()
        self._notify(job_id)
        if run is None:
            self._remove_files(job_id)
        self._removed(job_id)
        log.info("job %s: removed%s", job_id, " (its worker is stopping)" if run is not None else "")
        self._emit(job_id, "removed")

    def _removed(self, job_id: str) -> None:
        """The job is gone for good (cleanup, expiry): tell the hook (e.g. the avatar cache's job refs)."""
        if self._on_removed is None:
            return
        try:
            self._on_removed(job_id)
        except Exception:
            log.exception("job %s: the removal hook failed", job_id)

    def _remove_files(self, job_id: str) -> None:
        self._storage.delete(job_id)
        if not self._storage.is_local:
            self._files.remove(job_id)  # scratch, or a download copy

    # -- expiry ----------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None, *, orphan_grace_s: float | None = None) -> int:
        """Remove expired finished jobs (record, then files) and orphans; returns how many entries went.

        Expiry and stored orphans are handled by one replica at a time (``store.exclusive``);
        each replica clears its own local scratch.
        """
        now = now or utcnow()
        grace = self.orphan_grace_s if orphan_grace_s is None else orphan_grace_s
        removed = self._remove_local_orphans(grace)
        with self._store.exclusive("sweep") as mine:
            if not mine:
                return removed  # another replica is sweeping right now
            for rec in self._store.expired(now):
                if rec.job_id in self._running:
                    continue
                self._store.delete(rec.job_id)
                self._notify(rec.job_id)
                try:
                    self._remove_files(rec.job_id)
                except Exception:
                    log.exception("job %s: could not remove its files (the sweeper will retry)", rec.job_id)
                self._removed(rec.job_id)
                log.info("job %s: expired and removed", rec.job_id)
                self._emit(rec.job_id, "removed")
                removed += 1
            removed += self._remove_stored_orphans(grace)
        return removed

    def _remove_orphans(self, grace_s: float, local_grace_s: float) -> int:
        removed = self._remove_local_orphans(local_grace_s)
        with self._store.exclusive("sweep") as mine:
            if mine:
                removed += self._remove_stored_orphans(grace_s)
        return removed

    def _remove_local_orphans(self, grace_s: float) -> int:
        """Abandoned uploads; with a bucket, also this replica's scratch of jobs it no longer runs."""
        removed = 0
        with self._files_lock:
            abandoned = [j for j, t in self._uploads.items() if time.monotonic() - t > UPLOAD_TTL_S]
            for job_id in abandoned:  # an API request that died without discard_upload()
                del self._uploads[job_id]
                self._store.release_upload(job_id)
            if self._storage.is_local:
                return removed  # the local directories are the storage: see _remove_stored_orphans
            active = set(self._uploads) | set(self._running)
            for path in self._files.orphans(active, active, min_age_s=grace_s):
                try:
                    self._files.remove_orphan(path)
                    removed += 1
                    log.info("removed local scratch %s", path)
                except OSError:
                    log.exception("could not remove %s", path)
        return removed

    def _remove_stored_orphans(self, grace_s: float) -> int:
        """Stored files of jobs without a record, and leftovers of interrupted writes."""
        with self._files_lock:
            reserved = self._store.uploads() if self._store.shared else set()
            active = set(self._uploads) | set(self._running) | reserved
            if self._store.shared:  # running on another replica: its partial files are not leftovers
                active |= {r.job_id for r in self._store.list(statuses={JobStatus.processing}, limit=None)}
            try:
                return self._storage.sweep_orphans(_Known(self, reserved), active, grace_s)
            except Exception:
                log.exception("orphan sweep of %s failed", self._storage.description)
                return 0

    def _sweeper(self, stop: threading.Event) -> None:
        while True:  # once at start (jobs that expired while the service was down), then periodically
            try:
                self.sweep()
            except Exception:
                log.exception("job sweep failed")
            if stop.wait(self.sweep_interval_s):
                return

    # -- the heartbeat: leases, cross-replica cancels, lapsed jobs -------------------------

    def _heartbeat(self) -> None:
        while True:
            with self._lock:
                if not self._active and not self._running:
                    self._heartbeat_thread = None
                    return
            try:
                self.beat()
            except Exception:
                log.warning("job heartbeat failed (leases are renewed at the next beat)", exc_info=True)
            self._beat_now.wait(self.heartbeat_s)
            self._beat_now.clear()

    def beat(self) -> None:
        """One heartbeat: renew the leases of the jobs running here and of uploads in progress, stop
        jobs cancelled or removed elsewhere, re-queue jobs whose lease ran out anywhere."""
        running = list(self._running)
        held = self._store.renew(self.replica_id, running, self.lease_s)
        for job_id in running:
            run = self._running.get(job_id)
            if run is None:
                continue  # finished meanwhile
            if job_id in held:
                if held[job_id] and not run.cancel.is_set():
                    log.info("job %s: cancelled on another replica", job_id)
                    run.cancel.set()
                continue
            rec = self._store.get(job_id)
            if rec is None:
                run.doomed = True  # cleanup on another replica
            elif rec.status is JobStatus.processing and rec.lease_owner != self.replica_id:
                run.lost = True  # this process stalled past its lease and the job went elsewhere
                log.warning("job %s: lease lost to %s; this attempt stops", job_id, rec.lease_owner)
            else:
                continue  # finished by its own worker between the two reads
            run.cancel.set()
        self._store.renew_uploads(self.replica_id, list(self._uploads), self.lease_s)
        if self._active:
            self._requeue_lapsed()

    # -- workers ---------------------------------------------------------------------------

    def _worker(self, generation: int) -> None:
        while True:
            with self._work:
                if self._generation != generation:
                    return
                seen = self._submits
            try:
                rec = self._store.claim(self.replica_id, self.lease_s)
            except Exception:
                log.warning("job worker: could not claim a job (retrying)", exc_info=True)
                rec = None
            if rec is None:
                with self._work:
                    if self._generation == generation and self._submits == seen:
                        self._work.wait(self.poll_s)
                continue
            run = _Running(rec.job_id)
            with self._lock:
                self._running[rec.job_id] = run
            self._notify(rec.job_id)
            log.info("job %s: processing (attempt %d)", rec.job_id, rec.attempts)
            self._emit(rec.job_id, "started")
            try:
                self._run(rec, run)
            except BaseException:  # never lose a worker to a bug in the bookkeeping
                log.exception("job worker: unexpected error")
                with self._lock:
                    self._running.pop(rec.job_id, None)
                self._release_if_idle()

    def _run(self, rec: JobRecord, run: _Running) -> None:
        job_id = rec.job_id
        outcome_fields: dict[str, object]
        timings: dict[str, float] = {}
        try:
            work_dir = self._files.job_dir(job_id, create=True)
            ctx = JobContext(
                job=rec,
                work_dir=work_dir,
                progress=lambda stage, fraction: self._progress(run, stage, fraction),
                should_cancel=run.cancel.is_set,
                jobs=self,
            )
            self._stage_inputs(rec, work_dir, ctx)
            outcome = self._execute(ctx)
            output_file = _output_name(work_dir, outcome.output_file)
            if run.doomed or run.lost:  # removed, or taken over, while it ran: its result is not wanted
                raise JobCancelledError(CANCELLED_MESSAGE)
            # stored before the record says 'completed': a completed job always has its output, and
            # with a bucket, every replica finds what the worker fetched or made for it
            for name in dict.fromkeys(outcome.keep):
                if name != output_file:
                    self._storage.put(job_id, name, work_dir / _kept_name(work_dir, name))
            self._storage.put(job_id, output_file, work_dir / output_file)
            timings = {str(k): float(v) for k, v in (outcome.timings or {}).items()}
            outcome_fields = dict(status=JobStatus.completed, stage="done", progress=1.0,
                                  output_file=output_file, frames=int(outcome.frames), error=None,
                                  avatar_cache=None if outcome.cache_hit is None else
                                  ("hit" if outcome.cache_hit else "miss"), faces=outcome.faces)
            if outcome.media is not None:
                outcome_fields["media"] = outcome.media
        except JobCancelledError:
            outcome_fields = dict(status=JobStatus.cancelled, error=CANCELLED_MESSAGE)
        except LipSyncError as e:
            outcome_fields = dict(status=JobStatus.failed, error=e.message)
        except Exception as e:
            log.exception("job %s: internal error", job_id)
            message = INTERNAL_ERROR + (f": {type(e).__name__}: {e}" if self.debug else "")
            outcome_fields = dict(status=JobStatus.failed, error=message)
        if outcome_fields["status"] is not JobStatus.completed and run.cancel.is_set():
            # whatever broke, it had been asked to stop
            outcome_fields = dict(status=JobStatus.cancelled, error=CANCELLED_MESSAGE)
        self._finish(rec, run, outcome_fields, timings)

    def _stage_inputs(self, rec: JobRecord, work_dir: Path, ctx: JobContext) -> None:
        """Copy the stored inputs into local scratch (nothing to do when the storage is local)."""
        for name in dict.fromkeys(n for n in (rec.video_file, rec.audio_file) if n is not None):  # avatar: no audio
            if (work_dir / name).is_file():
                continue
            ctx.progress("staging", 0.0)
            try:
                self._storage.fetch(rec.job_id, name, work_dir / name)
            except FileNotFoundError:
                raise _MissingInputs(MISSING_INPUTS) from None

    def _finish(self, rec: JobRecord, run: _Running, fields: dict[str, object], timings: dict[str, float]) -> None:
        now = utcnow()
        status = fields.pop("status")
        assert isinstance(status, JobStatus)
        started = rec.started_at or now
        timings["queue_s"] = max(0.0, (started - rec.created_at).total_seconds())
        timings["total_s"] = max(0.0, (now - rec.created_at).total_seconds())
        # lease_owner stays: which worker ran the job is worth knowing afterwards
        final = {**self._finished_fields(status, now, **fields), "timings": timings, "lease_expires_at": None}
        if not run.doomed and not run.lost:
            if not self._write_final(rec.job_id, final):
                run.doomed = run.doomed or self._store_says_gone(rec.job_id)
        try:
            if run.doomed:
                self._remove_files(rec.job_id)  # removed while it ran: what it stored is an orphan
            elif not self._storage.is_local:
                self._files.remove(rec.job_id)  # scratch
        except Exception:
            log.exception("job %s: could not remove its files (the sweeper will)", rec.job_id)
        if run.doomed:  # what the run itself left here (its avatar refs) outlived the cleanup's hook
            self._removed(rec.job_id)
        with self._cond:
            self._running.pop(rec.job_id, None)
            self._durations.append(time.monotonic() - run.started)
        self._notify(rec.job_id)
        self._release_if_idle()
        log.info("job %s: %s%s", rec.job_id, "removed while running" if run.doomed else
                 "given up (lease lost)" if run.lost else status.value,
                 f" ({fields['error']})" if status is not JobStatus.completed and fields.get("error") else "")
        if not run.doomed and not run.lost:
            self._emit(rec.job_id, status.value)

    def _write_final(self, job_id: str, final: dict[str, object]) -> bool:
        """Record the outcome, retried: a lost write would leave the job 'processing' for good.

        Only while this worker still holds the job. If every attempt fails, the job is
        dropped from the heartbeat, its lease runs out and the queue takes it back.
        """
        def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
            if current.status is not JobStatus.processing or current.lease_owner != self.replica_id:
                raise _NotOurs
            return final

        delay = 0.2
        for attempt in range(1, FINAL_WRITE_ATTEMPTS + 1):
            try:
                self._store.modify(job_id, change)
                return True
            except (JobNotFoundError, _NotOurs):
                return False
            except Exception:
                log.warning("job %s: could not record its end (attempt %d of %d)", job_id, attempt,
                            FINAL_WRITE_ATTEMPTS, exc_info=True)
                time.sleep(delay)
                delay = min(5.0, delay * 2)
        log.error("job %s: its end could not be recorded; the job is re-queued when its lease runs out", job_id)
        return False

    def _store_says_gone(self, job_id: str) -> bool:
        try:
            return self._store.get(job_id) is None
        except Exception:
            return False

    def _finished_fields(self, status: JobStatus, now: datetime, **fields: object) -> dict[str, object]:
        base: dict[str, object] = {"stage": status.value, "completed_at": now,
                                   "expires_at": now + timedelta(seconds=self.retention_s)}
        base.update(fields)
        base["status"] = status
        return base

    def _progress(self, run: _Running, stage: str, fraction: float) -> None:
        try:
            fraction = min(1.0, max(0.0, float(fraction)))
        except (TypeError, ValueError):
            return
        if math.isnan(fraction):
            return
        stage = str(stage)
        run.stage, run.progress = stage, fraction
        if run.cancel.is_set():
            return
        now = time.monotonic()
        if stage == run.written_stage and now - run.written_at < PROGRESS_WRITE_INTERVAL_S:
            return
        run.written_stage, run.written_at = stage, now

        def change(current: JobRecord, _now: datetime) -> dict[str, object] | None:
            if current.status is not JobStatus.processing or current.lease_owner != self.replica_id:
                return None
            return {"stage": stage, "progress": fraction}

        try:
            self._store.modify(run.job_id, change)
        except JobNotFoundError:
            return
        except Exception:
            log.warning("job %s: could not record progress", run.job_id, exc_info=True)
            return
        self._emit(run.job_id, "progress")

    def _emit(self, job_id: str, event: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(job_id, event)
        except Exception:
            log.exception("job %s: the %s event listener failed", job_id, event)


class _NotOurs(Exception):
    """The record is no longer this worker's to write (finished or taken over elsewhere)."""


class _MissingInputs(LipSyncError):
    http_status = 500


def _output_name(work_dir: Path, output_file: str) -> str:
    """The executor's output as a plain name in the job's directory; RuntimeError if it is not there."""
    path = Path(output_file)
    if path.is_absolute():
        if path.parent != work_dir:
            raise RuntimeError(f"the executor wrote its output outside the job's directory: {path}")
        name = path.name
    else:
        name = output_file
    if not is_plain_name(name) or not (work_dir / name).is_file():
        raise RuntimeError(f"the executor reported an output file that does not exist: {output_file!r}")
    return name


def _kept_name(work_dir: Path, name: str) -> str:
    """A file the executor asked to keep: a plain name of a file in the job's directory (RuntimeError if not)."""
    if not is_plain_name(name) or not (work_dir / name).is_file():
        raise RuntimeError(f"the executor asked to keep a file that is not in the job's directory: {name!r}")
    return name


def _not_downloadable(rec: JobRecord) -> str:
    if rec.status is JobStatus.queued:
        return "the job is queued and has no result yet"
    if rec.status is JobStatus.processing:
        return f"the job is still processing ({rec.stage}, {rec.progress:.0%}); no result yet"
    if rec.status is JobStatus.failed:
        return f"the job failed and has no result: {rec.error or 'unknown error'}"
    return "the job was cancelled and has no result"
