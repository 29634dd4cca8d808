"""What the job manager's front, worker and sweeper share, and the steps all three take on a job.

One :class:`SharedState` per :class:`~lipsync_runner.jobs.manager.JobManager`, built first and
handed to each part: the store, the local files and the storage; one lock with its two wake-ups;
the jobs this process runs and the uploads it admitted (together they tell a live job from an
orphan, and say what the heartbeat renews); the lifecycle flags; and the notifications every part
sends (waiters, the event listener, the removal hook).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from lipsync_runner.jobs.records import JobStatus
from lipsync_runner.jobs.store import JobStore
from lipsync_runner.storage.job_files import JobFiles

if TYPE_CHECKING:
    from lipsync_runner.storage import JobStorage

# one logger for all the parts, the name it had before the split: log filters and the JSON
# logs' "logger" field stay as they were
LOG_NAME = "lipsync_runner.jobs.manager"
log = logging.getLogger(LOG_NAME)

CANCELLED_MESSAGE = "the job was cancelled"

EventListener = Callable[[str, str], None]
"""``(job_id, event)``: started, progress, completed, failed, cancelled, removed."""


@dataclass
class Running:
    """A job a worker of this process runs: what the front overlays on its record, what the heartbeat checks."""

    job_id: str
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    doomed: bool = False  # its record was removed (cleanup, here or elsewhere): files go when the worker lets go
    lost: bool = False  # its lease went to another worker: this run's outcome must not be recorded
    stage: str = "starting"
    progress: float = 0.0
    written_stage: str = ""
    written_at: float = 0.0


class SharedState:
    """The state of one job manager that more than one of its parts reads or changes."""

    def __init__(
        self,
        store: JobStore,
        files: JobFiles,
        storage: JobStorage,
        *,
        replica_id: str,
        lease_s: float,
        retention_s: float,
        on_removed: Callable[[str], None] | None,
        on_event: EventListener | None,
    ) -> None:
        self.store = store
        self.files = files
        self.storage = storage
        self.replica_id = replica_id  # who holds leases (jobs, uploads) in the shared store
        self.lease_s = lease_s
        self.retention_s = retention_s  # a finished record expires this long after its end
        self.on_removed = on_removed  # (job id): a job is gone for good (cleanup, expiry): e.g. its avatar refs
        self.on_event = on_event

        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # job state changes (waiters)
        self.work = threading.Condition(self.lock)  # something was queued here (idle workers)
        self.files_lock = threading.Lock()  # upload <-> submit <-> orphan removal
        self.submits = 0  # bumped per wake-up: a worker that saw no job but a newer submit claims again
        self.running: dict[str, Running] = {}
        self.uploads: dict[str, float] = {}  # job id -> monotonic time of new_upload
        self.async_waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self.durations: deque[float] = deque(maxlen=20)  # the last jobs' run times (Retry-After)
        # lifecycle, under ``lock``: taking jobs (start..stop); close() asked for; store closed
        self.active = False
        self.closing = False
        self.closed = False

    def notify(self, job_id: str) -> None:
        """Wake waiters of this job (status change or deletion)."""
        with self.changed:
            self.changed.notify_all()
            for loop, event in list(self.async_waiters.get(job_id, ())):
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # that loop is closed
                    pass

    def wake_workers(self) -> None:
        """A job was queued (submitted here, or re-queued): one idle worker claims at once."""
        with self.work:
            self.submits += 1
            self.work.notify()

    def emit(self, job_id: str, event: str) -> None:
        """Tell the event listener, outside the locks; its failure is logged, never raised."""
        if self.on_event is None:
            return
        try:
            self.on_event(job_id, event)
        except Exception:
            log.exception("job %s: the %s event listener failed", job_id, event)

    def removed(self, job_id: str) -> None:
        """The job is gone for good (cleanup, expiry): tell the hook (e.g. the avatar cache's job refs)."""
        if self.on_removed is None:
            return
        try:
            self.on_removed(job_id)
        except Exception:
            log.exception("job %s: the removal hook failed", job_id)

    def remove_files(self, job_id: str) -> None:
        """The job's stored files, and with a bucket its local scratch (or download copy) too."""
        self.storage.delete(job_id)
        if not self.storage.is_local:
            self.files.remove(job_id)  # scratch, or a download copy

    def finished_fields(self, status: JobStatus, now: datetime, **fields: object) -> dict[str, object]:
        """The record fields of a job that ends now with ``status`` (it expires ``retention_s`` later)."""
        base: dict[str, object] = {"stage": status.value, "completed_at": now,
                                   "expires_at": now + timedelta(seconds=self.retention_s)}
        base.update(fields)
        base["status"] = status
        return base
