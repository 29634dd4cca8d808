"""Background lip-sync jobs: admission, a FIFO queue, worker threads, cancel, recovery, expiry.

The API layer owns one :class:`JobManager`. A request goes

    new_upload() -> (job id, empty directory)   # admission: free space, queue length
    ... the API streams and validates the uploads into that directory ...
    submit(job id, file names, params)          # record 'queued', enqueue
    get / list / wait_async / output_path / cancel / cleanup

Workers take jobs off an in-memory FIFO queue (fed by ``submit`` and by recovery at
``start``) and run the :data:`Executor` (the pipeline) with a :class:`JobContext`.
Records live in a :class:`JobStore`, so they survive restarts: at ``start`` a job left
'processing' by a crash is re-queued (or failed once it has used its attempts), queued
jobs are re-queued in creation order and directories without a record are removed.
Finished jobs are kept ``retention_s`` seconds, then the sweeper removes record and files.

One manager per data directory (``start`` takes a lock on it); everything is thread-safe.

``on_event(job_id, event)``, when given, is told what happens to jobs: ``started``,
``progress`` (when the progress is written, at most every PROGRESS_WRITE_INTERVAL_S),
``completed``, ``failed``, ``cancelled`` and ``removed`` (cleanup, expiry). It is called
after the store says so, outside the manager's locks, on whichever thread made the change;
an exception in it is logged and ignored. Webhooks, usage and job logs hang off it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from ..errors import (
    JobCancelledError,
    JobNotFinishedError,
    JobNotFoundError,
    LipSyncError,
    QueueFullError,
)
from .files import OUTPUT_NAME, JobFiles, is_plain_name
from .records import JobKind, JobParams, JobRecord, JobStatus, is_job_id, new_job_id, utcnow
from .store import JobStore, SQLiteJobStore

log = logging.getLogger(__name__)

INTERNAL_ERROR = "internal error while processing the job"
CANCELLED_MESSAGE = "the job was cancelled"
DB_NAME = "jobs.sqlite3"
PROGRESS_WRITE_INTERVAL_S = 0.5  # at most one progress write per job per interval (plus one per stage change)
UPLOAD_TTL_S = 3600.0  # an upload directory not submitted within this is abandoned (then swept)
WAIT_POLL_S = 1.0  # waiters re-read the store at least this often (a change made by another process)
DEFAULT_JOB_SECONDS = 60.0  # assumed job duration for Retry-After before any job has finished


@dataclass
class JobContext:
    """What an executor gets: the record, the job's directory and two callbacks."""

    job: JobRecord
    work_dir: Path
    progress: Callable[[str, float], None]  # (stage, overall fraction 0..1); cheap, throttled by the manager
    should_cancel: Callable[[], bool]  # poll it; raise JobCancelledError when it says True

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


Executor = Callable[[JobContext], JobOutcome]
"""Runs the pipeline; raises LipSyncError (failure shown to the user) or any Exception (internal)."""

EventListener = Callable[[str, str], None]
"""``(job_id, event)``: started, progress, completed, failed, cancelled, removed."""


@dataclass
class _Running:
    job_id: str
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    doomed: bool = False  # cleanup() asked for it: its record is gone, files go when the worker lets go
    stage: str = "starting"
    progress: float = 0.0
    written_stage: str = ""
    written_at: float = 0.0


class _KnownIds:
    """``in`` answers whether a job id still belongs to something (for orphan detection)."""

    def __init__(self, manager: JobManager) -> None:
        self._m = manager

    def __contains__(self, job_id: object) -> bool:
        m = self._m
        if job_id in m._uploads or job_id in m._running:
            return True
        return isinstance(job_id, str) and m._store.get(job_id) is not None


class JobManager:
    def __init__(
        self,
        store: JobStore,
        files: JobFiles,
        execute: Executor,
        *,
        workers: int = 2,
        retention_s: float = 86400,
        max_attempts: int = 2,
        sweep_interval_s: float = 300,
        max_queued: int = 100,
        free_space_floor_bytes: int = 0,
        debug: bool = False,
        orphan_grace_s: float = 600,
        on_removed: Callable[[str], None] | None = None,
        on_event: EventListener | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._store = store
        self._files = files
        self._execute = execute
        self.workers = int(workers)
        self.retention_s = float(retention_s)
        self.max_attempts = int(max_attempts)
        self.sweep_interval_s = float(sweep_interval_s)
        self.max_queued = int(max_queued)
        self.free_space_floor_bytes = int(free_space_floor_bytes)
        self.debug = bool(debug)
        self.orphan_grace_s = float(orphan_grace_s)  # periodic sweeps leave younger orphans alone
        self._on_removed = on_removed  # (job id): a job is gone for good (cleanup, expiry): e.g. its avatar refs
        self.on_event = on_event

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._files_lock = threading.Lock()  # upload <-> submit <-> orphan removal
        self._queue: deque[str] = deque()
        self._queued_ids: set[str] = set()
        self._running: dict[str, _Running] = {}
        self._uploads: dict[str, float] = {}  # job id -> monotonic time of new_upload
        self._async_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._durations: deque[float] = deque(maxlen=20)
        self._generation = 0  # bumped by stop(): workers of an older generation exit
        self._active = False
        self._threads: list[threading.Thread] = []
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

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, then start the workers and the sweeper (idempotent)."""
        with self._lock:
            if self._active:
                return
            self._files.acquire_lock()
            failed = self._recover()
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
            for t in self._threads:
                t.start()
        log.info("job manager started: %d worker(s), %d job(s) queued", self.workers, len(self._queue))
        for job_id in failed:
            self._emit(job_id, JobStatus.failed.value)

    def stop(self, timeout: float = 10) -> None:
        """Stop taking jobs and join the threads (for up to ``timeout`` seconds).

        Running jobs are not cancelled: a job still running when the process exits stays
        'processing' in the store and the next ``start`` re-queues it.
        """
        with self._cond:
            if not self._active:
                return
            self._active = False
            self._generation += 1
            self._stop_event.set()
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        still = [t.name for t in threads if t.is_alive()]
        if still:
            log.warning("job manager stopped with %d job(s) still running; they will finish or be "
                        "re-queued at the next start", len(still))
        with self._lock:
            if not self._running:
                self._files.release_lock()

    def close(self, timeout: float = 10) -> None:
        """``stop`` and close the store."""
        self.stop(timeout)
        self._files.release_lock()
        self._store.close()

    def _recover(self) -> list[str]:
        """Re-queue interrupted and queued jobs; fail those out of attempts or inputs (their ids); drop orphans."""
        requeue: list[JobRecord] = []
        failed: list[str] = []
        now = utcnow()
        for rec in self._store.list(statuses={JobStatus.processing, JobStatus.queued}, limit=None):
            if rec.job_id in self._running or rec.job_id in self._queued_ids:
                continue  # still running in this process (stop() then start()) or already queued
            inputs_ok = self._inputs_present(rec)
            if rec.status is JobStatus.processing:
                if rec.attempts < self.max_attempts and inputs_ok:
                    rec = self._store.update(rec.job_id, status=JobStatus.queued, stage="queued", progress=0.0)
                    log.info("job %s: re-queued after an interrupted attempt %d", rec.job_id, rec.attempts)
                    requeue.append(rec)
                else:
                    reason = f"the server stopped while the job was running (attempt {rec.attempts} of " \
                             f"{self.max_attempts})"
                    if not inputs_ok:
                        reason += "; its input files are gone"
                    self._store.update(rec.job_id, **self._finished_fields(JobStatus.failed, now, error=reason))
                    log.warning("job %s: %s", rec.job_id, reason)
                    failed.append(rec.job_id)
            elif inputs_ok:
                requeue.append(rec)
            else:
                self._store.update(rec.job_id, **self._finished_fields(
                    JobStatus.failed, now, error="the job's input files are missing"))
                failed.append(rec.job_id)
        requeue.sort(key=lambda r: r.created_at)
        for rec in requeue:
            self._enqueue(rec.job_id)
        self._remove_orphans(grace_s=0.0)
        return failed

    def _inputs_present(self, rec: JobRecord) -> bool:
        try:
            return all(self._files.path(rec.job_id, name).is_file()
                       for name in (rec.video_file, rec.audio_file) if name is not None)
        except (ValueError, LipSyncError):
            return False

    # -- uploads and submission ------------------------------------------------------------

    def new_upload(self) -> tuple[str, Path]:
        """A new job id and its (created, empty) directory for the API to stream uploads into.

        Raises InsufficientStorageError below the free-space floor and QueueFullError when
        ``max_queued`` jobs are already waiting (uploads in progress count as waiting).
        """
        self._files.check_free_space(self.free_space_floor_bytes)
        with self._files_lock:
            waiting = self._store.count_by_status()[JobStatus.queued.value] + len(self._uploads)
            if waiting >= self.max_queued:
                retry = self._retry_after_s()
                raise QueueFullError(
                    f"the server is busy ({waiting} jobs waiting); try again in about {retry} s", retry_after_s=retry
                )
            job_id = new_job_id()
            self._uploads[job_id] = time.monotonic()
            try:
                directory = self._files.job_dir(job_id, create=True)
            except BaseException:
                self._uploads.pop(job_id, None)
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
        """Remove the directory of an upload that will not be submitted (failed validation)."""
        directory = self._files.job_dir(job_id)  # JobNotFoundError for a malformed id
        with self._files_lock:
            self._uploads.pop(job_id, None)
            if self._store.get(job_id) is not None:
                log.warning("discard_upload(%s): the job was already submitted; leaving it", job_id)
                return
            self._files.remove_orphan(directory)

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
        """Record the uploaded job as queued and enqueue it.

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
        with self._files_lock:
            self._store.create(record)
            self._uploads.pop(job_id, None)
        with self._cond:
            self._enqueue(job_id)
        log.info("job %s: queued", job_id)
        return record

    def _enqueue(self, job_id: str) -> None:
        with self._cond:
            if job_id not in self._queued_ids:
                self._queue.append(job_id)
                self._queued_ids.add(job_id)
                self._cond.notify_all()

    def extend_expiry(self, job_id: str) -> None:
        """Keep a finished record (an avatar just used) for another ``retention_s`` from now."""
        until = utcnow() + timedelta(seconds=self.retention_s)
        with self._cond:
            rec = self._store.get(job_id)
            if rec is not None and rec.status.finished and (rec.expires_at is None or rec.expires_at < until):
                self._store.update(job_id, expires_at=until)

    # -- queries ---------------------------------------------------------------------------

    def _overlay(self, rec: JobRecord) -> JobRecord:
        """The freshest progress of a job running here (the store is written throttled)."""
        run = self._running.get(rec.job_id)
        if run is None or rec.status is not JobStatus.processing:
            return rec
        stage = "cancelling" if run.cancel.is_set() else run.stage
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
        """Jobs per status, e.g. ``{"queued": 3, "processing": 2, "completed": 10, ...}``."""
        return self._store.count_by_status()

    def output_path(self, job_id: str, owner: str | None = None) -> Path:
        """The result file of a completed job; JobNotFinishedError (409) otherwise."""
        rec = self._overlay(self._lookup(job_id, owner))
        if rec.status is not JobStatus.completed:
            raise JobNotFinishedError(_not_downloadable(rec))
        try:
            path = self._files.path(job_id, rec.output_file or "")
        except ValueError:
            path = None
        if path is None or not path.is_file():
            raise JobNotFinishedError("the job's output file is no longer available")
        return path

    def input_path(self, job_id: str, name: str, owner: str | None = None) -> Path:
        """A file admission stored with the job (an input, its thumbnail); JobNotFoundError if absent."""
        self._lookup(job_id, owner)
        try:
            path = self._files.path(job_id, name)
        except ValueError:
            raise JobNotFoundError("no such job") from None
        if not path.is_file():
            raise JobNotFoundError("no such job")
        return path

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
        """Wake waiters of this job (status change or deletion). Call with the lock held."""
        self._cond.notify_all()
        for loop, event in list(self._async_waiters.get(job_id, ())):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass

    # -- cancel and cleanup ----------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        """Queued: cancelled now. Processing: the worker is told to stop (the record says stage
        'cancelling' until it does, then 'cancelled'). Finished: returned unchanged."""
        self._lookup(job_id, owner)
        with self._cond:
            rec = self._lookup(job_id, owner)
            if rec.status.finished:
                return rec
            run = self._running.get(job_id)
            if run is not None:
                if not run.cancel.is_set():
                    run.cancel.set()
                    log.info("job %s: cancel requested", job_id)
                return self._overlay(rec)
            # queued (or 'processing' with no worker here: left by a crash, not yet recovered)
            self._drop_from_queue(job_id)
            rec = self._store.update(job_id, **self._finished_fields(JobStatus.cancelled, utcnow(),
                                                                     error=CANCELLED_MESSAGE))
            self._notify(job_id)
        log.info("job %s: cancelled", job_id)
        self._emit(job_id, JobStatus.cancelled.value)
        return rec

    def cleanup(self, job_id: str, owner: str | None = None) -> None:
        """Forget the job: cancel it if needed, delete its record and its files.

        The record goes at once (the job is 404 from now on). The files of a running job
        go when its worker notices the cancel (a chunk later); if the process dies first,
        the directory is an orphan and the next start removes it.
        """
        self._lookup(job_id, owner)
        with self._cond:
            self._lookup(job_id, owner)
            self._drop_from_queue(job_id)
            self._store.delete(job_id)
            run = self._running.get(job_id)
            if run is not None:
                run.doomed = True
                run.cancel.set()
            self._notify(job_id)
        if run is None:
            self._files.remove(job_id)
        self._removed(job_id)
        log.info("job %s: removed%s", job_id, " (its worker is stopping)" if run is not None else "")
        self._emit(job_id, "removed")

    def _removed(self, job_id: str) -> None:
        if self._on_removed is None:
            return
        try:
            self._on_removed(job_id)
        except Exception:
            log.exception("job %s: the removal hook failed", job_id)

    def _drop_from_queue(self, job_id: str) -> None:
        if job_id in self._queued_ids:
            self._queued_ids.discard(job_id)
            try:
                self._queue.remove(job_id)
            except ValueError:
                pass

    # -- expiry ----------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None, *, orphan_grace_s: float | None = None) -> int:
        """Remove expired finished jobs (record, then files) and orphans; returns how many entries went."""
        now = now or utcnow()
        removed = 0
        for rec in self._store.expired(now):
            with self._cond:
                if rec.job_id in self._running:
                    continue
                current = self._store.get(rec.job_id)
                if current is None or not current.status.finished:
                    continue
                self._store.delete(rec.job_id)
                self._notify(rec.job_id)
            try:
                self._files.remove(rec.job_id)
            except OSError:
                log.exception("job %s: could not remove its files (the sweeper will retry)", rec.job_id)
            self._removed(rec.job_id)
            log.info("job %s: expired and removed", rec.job_id)
            self._emit(rec.job_id, "removed")
            removed += 1
        removed += self._remove_orphans(self.orphan_grace_s if orphan_grace_s is None else orphan_grace_s)
        return removed

    def _remove_orphans(self, grace_s: float) -> int:
        removed = 0
        with self._files_lock:
            abandoned = [j for j, t in self._uploads.items() if time.monotonic() - t > UPLOAD_TTL_S]
            for job_id in abandoned:  # an API request that died without discard_upload()
                del self._uploads[job_id]
            active = set(self._uploads) | set(self._running)
            for path in self._files.orphans(_KnownIds(self), active, min_age_s=grace_s):
                try:
                    self._files.remove_orphan(path)
                    removed += 1
                    log.info("removed orphan %s", path)
                except OSError:
                    log.exception("could not remove orphan %s", path)
        return removed

    def _sweeper(self, stop: threading.Event) -> None:
        while True:  # once at start (jobs that expired while the service was down), then periodically
            try:
                self.sweep()
            except Exception:
                log.exception("job sweep failed")
            if stop.wait(self.sweep_interval_s):
                return

    # -- workers ---------------------------------------------------------------------------

    def _worker(self, generation: int) -> None:
        while True:
            claimed = self._claim(generation)
            if claimed is None:
                return
            self._emit(claimed[0].job_id, "started")
            try:
                self._run(*claimed)
            except BaseException:  # never lose a worker to a bug in the bookkeeping
                log.exception("job worker: unexpected error")

    def _claim(self, generation: int) -> tuple[JobRecord, _Running] | None:
        """Next queued job, marked 'processing'; None when the manager stops."""
        with self._cond:
            while True:
                if self._generation != generation:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                job_id = self._queue.popleft()
                self._queued_ids.discard(job_id)
                try:
                    rec = self._store.get(job_id)
                    if rec is None or rec.status is not JobStatus.queued:
                        continue  # cancelled or removed while waiting
                    rec = self._store.update(
                        job_id, status=JobStatus.processing, stage="starting", progress=0.0,
                        started_at=utcnow(), attempts=rec.attempts + 1, error=None,
                    )
                except Exception:
                    log.exception("job %s: could not start it (it stays queued until the next start)", job_id)
                    continue
                run = _Running(job_id)
                self._running[job_id] = run
                self._notify(job_id)
                log.info("job %s: processing (attempt %d)", job_id, rec.attempts)
                return rec, run

    def _run(self, rec: JobRecord, run: _Running) -> None:
        job_id = rec.job_id
        outcome_fields: dict[str, object]
        timings: dict[str, float] = {}
        try:
            work_dir = self._files.job_dir(job_id)
            ctx = JobContext(
                job=rec,
                work_dir=work_dir,
                progress=lambda stage, fraction: self._progress(run, stage, fraction),
                should_cancel=run.cancel.is_set,
            )
            outcome = self._execute(ctx)
            output_file = _output_name(work_dir, outcome.output_file)
            timings = {str(k): float(v) for k, v in (outcome.timings or {}).items()}
            outcome_fields = dict(status=JobStatus.completed, stage="done", progress=1.0,
                                  output_file=output_file, frames=int(outcome.frames), error=None,
                                  avatar_cache=None if outcome.cache_hit is None else
                                  ("hit" if outcome.cache_hit else "miss"))
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

    def _finish(self, rec: JobRecord, run: _Running, fields: dict[str, object], timings: dict[str, float]) -> None:
        now = utcnow()
        status = fields.pop("status")
        assert isinstance(status, JobStatus)
        started = rec.started_at or now
        timings["queue_s"] = max(0.0, (started - rec.created_at).total_seconds())
        timings["total_s"] = max(0.0, (now - rec.created_at).total_seconds())
        with self._cond:
            self._running.pop(rec.job_id, None)
            self._durations.append(time.monotonic() - run.started)
            if not run.doomed:
                try:
                    self._store.update(rec.job_id, **self._finished_fields(status, now, **fields), timings=timings)
                except JobNotFoundError:
                    pass
                except Exception:
                    log.exception("job %s: could not record its end (%s)", rec.job_id, status.value)
            self._notify(rec.job_id)
            if not self._active and not self._running:
                self._files.release_lock()
        if run.doomed:
            try:
                self._files.remove(rec.job_id)
            except OSError:
                log.exception("job %s: could not remove its files (the sweeper will)", rec.job_id)
        log.info("job %s: %s%s", rec.job_id, status.value,
                 f" ({fields['error']})" if status is not JobStatus.completed and fields.get("error") else "")
        if not run.doomed:
            self._emit(rec.job_id, status.value)

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
        try:
            self._store.update(run.job_id, stage=stage, progress=fraction)
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


def _not_downloadable(rec: JobRecord) -> str:
    if rec.status is JobStatus.queued:
        return "the job is queued and has no result yet"
    if rec.status is JobStatus.processing:
        return f"the job is still processing ({rec.stage}, {rec.progress:.0%}); no result yet"
    if rec.status is JobStatus.failed:
        return f"the job failed and has no result: {rec.error or 'unknown error'}"
    return "the job was cancelled and has no result"
