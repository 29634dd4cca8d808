"""Background lip-sync jobs: the job manager, one per process, built from its three parts.

The API layer owns one :class:`JobManager` per process. A request goes

    new_upload(owner) -> (job id, empty local directory)  # admission: free space, queue length (the owner's too)
    ... the API streams and validates the uploads into that directory ...
    submit(job id, file names, params, media=...)     # the directory's files -> storage, then 'queued'
    get / list / wait_async / open_output / output_path / open_file / input_path / cancel / cleanup

The manager composes, over one :class:`~lipsync_runner.jobs.shared.SharedState`,

* the front (:class:`~lipsync_runner.jobs.front.JobFront`): admission into the store, queries,
  waits, cancel and cleanup; every method above is its;
* the worker (:class:`~lipsync_runner.jobs.worker.JobWorker`): claims, runs, leases, heartbeat;
* the sweeper (:class:`~lipsync_runner.jobs.sweeper.JobSweeper`): retention and orphans;

and owns what spans them: start (recovery first), stop and close.

**The store is the queue.** Workers ``claim`` the next queued job from the
:class:`JobStore` (owners take turns, the oldest job of each first); with PostgreSQL every
replica of the API claims from the same table, so any replica may run any job. A claimed
job carries a lease that a heartbeat thread renews every few seconds; the same heartbeat reads
back cancel requests made on other replicas and notices jobs that were removed. When a process
dies its leases run out, and any replica puts those jobs back in the queue (or fails them once
they have used ``max_attempts``).

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

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from lipsync_runner.jobs.front import UNSAID, JobFront, Unsaid
from lipsync_runner.jobs.records import JobKind, JobParams, JobRecord
from lipsync_runner.jobs.shared import EventListener, Running, SharedState
from lipsync_runner.jobs.store import SQLITE_NAME, JobStore, SQLiteJobStore
from lipsync_runner.jobs.sweeper import JobSweeper
from lipsync_runner.jobs.worker import (
    FINAL_WRITE_ATTEMPTS,
    INTERNAL_ERROR,
    Executor,
    JobContext,
    JobOutcome,
    JobWorker,
)
from lipsync_runner.storage.job_files import JobFiles

if TYPE_CHECKING:
    from lipsync_runner.storage import JobStorage, StoredObject

__all__ = ["FINAL_WRITE_ATTEMPTS", "INTERNAL_ERROR", "EventListener", "Executor", "JobContext", "JobManager",
           "JobOutcome", "default_replica_id"]

log = logging.getLogger(__name__)

DB_NAME = SQLITE_NAME


def default_replica_id() -> str:
    """Who holds a lease: the pod's host name, the process, and a random part (never reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobManager:
    """The job manager: the front's methods, the worker's and sweeper's lifecycle (see the module)."""

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
        max_queued_per_owner: int | None = None,
        max_running_per_owner: int = 0,
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
        if (max_queued_per_owner is not None and max_queued_per_owner < 1) or max_running_per_owner < 0:
            raise ValueError("max_queued_per_owner must be at least 1, max_running_per_owner at least 0")
        if storage is None:
            from lipsync_runner.storage.local import LocalStorage

            storage = LocalStorage(files)
        self._execute = execute
        self._shared = shared = SharedState(
            store, files, storage, replica_id=replica_id or default_replica_id(), lease_s=float(lease_s),
            retention_s=float(retention_s), on_removed=on_removed, on_event=on_event)
        self._front = JobFront(shared, workers=int(workers), max_queued=int(max_queued),
                               free_space_floor_bytes=int(free_space_floor_bytes),
                               max_queued_per_owner=None if max_queued_per_owner is None else int(max_queued_per_owner))
        # FINAL_WRITE_ATTEMPTS read here, from this module, at construction: a test may patch it
        self._worker = JobWorker(shared, execute, self._front, workers=int(workers), max_attempts=int(max_attempts),
                                 poll_s=float(poll_s), debug=bool(debug), final_write_attempts=FINAL_WRITE_ATTEMPTS,
                                 max_running_per_owner=int(max_running_per_owner))
        self._sweeper = JobSweeper(shared, sweep_interval_s=float(sweep_interval_s),
                                   orphan_grace_s=float(orphan_grace_s))

    @classmethod
    def from_data_dir(cls, data_dir: Path | str, execute: Executor, **kwargs: object) -> JobManager:
        """A manager with a SQLite store (``<data_dir>/jobs.sqlite3``) and files under ``<data_dir>/jobs``."""
        data_dir = Path(data_dir)
        files = JobFiles(data_dir)
        return cls(SQLiteJobStore(data_dir / DB_NAME), files, execute, **kwargs)  # type: ignore[arg-type]

    # -- what it works with, and its configuration (held by the part that uses it) ----------

    @property
    def store(self) -> JobStore:
        return self._shared.store

    @property
    def files(self) -> JobFiles:
        return self._shared.files

    @property
    def storage(self) -> JobStorage:
        return self._shared.storage

    @property
    def replica_id(self) -> str:
        return self._shared.replica_id

    @property
    def lease_s(self) -> float:
        return self._shared.lease_s

    @property
    def retention_s(self) -> float:
        return self._shared.retention_s

    @property
    def on_event(self) -> EventListener | None:
        return self._shared.on_event

    @on_event.setter
    def on_event(self, listener: EventListener | None) -> None:
        self._shared.on_event = listener

    @property
    def workers(self) -> int:
        return self._worker.workers

    @property
    def max_attempts(self) -> int:
        return self._worker.max_attempts

    @property
    def poll_s(self) -> float:
        return self._worker.poll_s

    @property
    def heartbeat_s(self) -> float:
        return self._worker.heartbeat_s

    @property
    def debug(self) -> bool:
        return self._worker.debug

    @property
    def max_queued(self) -> int:
        return self._front.max_queued

    @property
    def max_queued_per_owner(self) -> int | None:
        return self._front.max_queued_per_owner

    @property
    def max_running_per_owner(self) -> int:
        return self._worker.max_running_per_owner

    @property
    def free_space_floor_bytes(self) -> int:
        return self._front.free_space_floor_bytes

    @property
    def sweep_interval_s(self) -> float:
        return self._sweeper.sweep_interval_s

    @property
    def orphan_grace_s(self) -> float:
        return self._sweeper.orphan_grace_s

    # the shared tables, by their old names (tests look at them)
    @property
    def _store(self) -> JobStore:
        return self._shared.store

    @property
    def _running(self) -> dict[str, Running]:
        return self._shared.running

    @property
    def _uploads(self) -> dict[str, float]:
        return self._shared.uploads

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Recover what a previous run left, then start the workers, the heartbeat and the sweeper
        (idempotent)."""
        s = self._shared
        with s.lock:
            if s.active:
                return
            if s.closed:
                raise RuntimeError("the job manager is closed")
            if not s.store.shared:
                s.files.acquire_lock()
            s.closing = False
            # nothing runs here yet: interrupted jobs back to the queue, then the leftovers
            exclusive = not s.store.shared
            self._worker.recover(exclusive)
            self._sweeper.clear_leftovers(exclusive)
            s.active = True
            self._worker.start()
            self._sweeper.start()
        log.info("job manager %s started: %d worker(s); jobs in %s, files in %s", s.replica_id, self.workers,
                 type(s.store).__name__, s.storage.description)

    def stop(self, timeout: float = 10) -> None:
        """Stop taking jobs and join the threads (for up to ``timeout`` seconds).

        Running jobs are not cancelled: they keep their leases while they run here. A job
        still running when the process exits stays 'processing' until its lease runs out;
        then any replica (or the next start, for SQLite) queues it again.
        """
        s = self._shared
        with s.changed:
            if not s.active:
                return
            s.active = False
            threads = [*self._worker.stop(), *self._sweeper.stop()]  # the heartbeat beats on for running jobs
            s.changed.notify_all()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        still = [t.name for t in threads if t.is_alive()]
        if still:
            log.warning("job manager stopped with %d job(s) still running; they will finish or be "
                        "re-queued when their lease runs out", len(still))
        self._worker.release_if_idle()

    def close(self, timeout: float = 10) -> None:
        """``stop``, then close the store and release the data directory: at once if nothing runs,
        else when the last running job has finished (never under a live job)."""
        with self._shared.lock:
            self._shared.closing = True
        self.stop(timeout)
        self._worker.release_if_idle()

    # -- the worker and the sweeper, one step at a time ------------------------------------

    def beat(self) -> None:
        """One heartbeat (:meth:`JobWorker.beat`)."""
        self._worker.beat()

    def sweep(self, now: datetime | None = None, *, orphan_grace_s: float | None = None) -> int:
        """One sweep (:meth:`JobSweeper.sweep`); returns how many entries went."""
        return self._sweeper.sweep(now, orphan_grace_s=orphan_grace_s)

    # -- the front (:class:`JobFront` has the details) -------------------------------------

    def new_upload(self, owner: str | None | Unsaid = UNSAID) -> tuple[str, Path]:
        return self._front.new_upload(owner)

    def check_free_space(self) -> None:
        self._front.check_free_space()

    def discard_upload(self, job_id: str) -> None:
        self._front.discard_upload(job_id)

    def submit(self, job_id: str, *, video_file: str, audio_file: str | None, video_filename: str,
               audio_filename: str | None, params: JobParams, owner: str | None = None, media: dict | None = None,
               kind: JobKind = JobKind.job) -> JobRecord:
        return self._front.submit(job_id, video_file=video_file, audio_file=audio_file, video_filename=video_filename,
                                  audio_filename=audio_filename, params=params, owner=owner, media=media, kind=kind)

    def extend_expiry(self, job_id: str) -> None:
        self._front.extend_expiry(job_id)

    def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        return self._front.get(job_id, owner)

    def list(self, owner: str | None = None, limit: int = 100, kind: JobKind | None = JobKind.job) -> list[JobRecord]:
        return self._front.list(owner, limit, kind)

    def counts(self) -> dict[str, int]:
        return self._front.counts()

    def open_output(self, job_id: str, owner: str | None = None) -> StoredObject:
        return self._front.open_output(job_id, owner)

    def output_path(self, job_id: str, owner: str | None = None) -> Path:
        return self._front.output_path(job_id, owner)

    def open_file(self, job_id: str, name: str, owner: str | None = None) -> StoredObject:
        return self._front.open_file(job_id, name, owner)

    def input_path(self, job_id: str, name: str, owner: str | None = None) -> Path:
        return self._front.input_path(job_id, name, owner)

    def wait(self, job_id: str, timeout: float | None = None) -> JobRecord:
        return self._front.wait(job_id, timeout)

    async def wait_async(self, job_id: str, timeout: float | None = None) -> JobRecord:
        return await self._front.wait_async(job_id, timeout)

    def cancel(self, job_id: str, owner: str | None = None) -> JobRecord:
        return self._front.cancel(job_id, owner)

    def cleanup(self, job_id: str, owner: str | None = None) -> None:
        self._front.cleanup(job_id, owner)
