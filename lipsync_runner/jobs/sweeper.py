"""The job manager's sweeper: retention of finished jobs and removal of orphaned files.

:meth:`JobSweeper.sweep` deletes expired finished jobs (record, then files) and orphans: uploads
abandoned here, this replica's scratch of jobs it no longer runs (with a bucket), and stored files
of jobs without a record. Expiry and stored orphans are handled by one replica at a time
(``store.exclusive``); each replica clears its own local scratch. A thread sweeps once at start
(jobs that expired while the service was down), then every ``sweep_interval_s``.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

from lipsync_runner.jobs.records import JobStatus, utcnow
from lipsync_runner.jobs.shared import LOG_NAME, SharedState

log = logging.getLogger(LOG_NAME)  # the manager's logger: one for all its parts

UPLOAD_TTL_S = 3600.0  # an upload directory not submitted within this is abandoned (then swept)


class _Known:
    """``in`` answers whether a job id still belongs to something (for orphan detection)."""

    def __init__(self, shared: SharedState, reserved: set[str]) -> None:
        self._s, self._reserved = shared, reserved

    def __contains__(self, job_id: object) -> bool:
        s = self._s
        if job_id in s.uploads or job_id in s.running or job_id in self._reserved:
            return True
        return isinstance(job_id, str) and s.store.get(job_id) is not None


class JobSweeper:
    """Retention and orphan removal for one job manager, and the thread that runs them."""

    def __init__(self, shared: SharedState, *, sweep_interval_s: float, orphan_grace_s: float) -> None:
        self._s = shared
        self.sweep_interval_s = sweep_interval_s
        self.orphan_grace_s = orphan_grace_s  # periodic sweeps leave younger orphans alone
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- lifecycle (the manager calls these under the shared lock) --------------------------

    def start(self) -> None:
        self._stop = threading.Event()  # a fresh one per start: the old thread may still be on its way out
        self._thread = threading.Thread(target=self._loop, args=(self._stop,), name="job-sweeper", daemon=True)
        self._thread.start()

    def stop(self) -> list[threading.Thread]:
        """Tell the sweeper thread to exit; returns it (if started), to be joined."""
        self._stop.set()
        thread, self._thread = self._thread, None
        return [] if thread is None else [thread]

    def _loop(self, stop: threading.Event) -> None:
        while True:  # once at start (jobs that expired while the service was down), then periodically
            try:
                self.sweep()
            except Exception:
                log.exception("job sweep failed")
            if stop.wait(self.sweep_interval_s):
                return

    # -- sweeping --------------------------------------------------------------------------

    def sweep(self, now: datetime | None = None, *, orphan_grace_s: float | None = None) -> int:
        """Remove expired finished jobs (record, then files) and orphans; returns how many entries went.

        Expiry and stored orphans are handled by one replica at a time (``store.exclusive``);
        each replica clears its own local scratch.
        """
        s = self._s
        now = now or utcnow()
        grace = self.orphan_grace_s if orphan_grace_s is None else orphan_grace_s
        removed = self._remove_local_orphans(grace)
        with s.store.exclusive("sweep") as mine:
            if not mine:
                return removed  # another replica is sweeping right now
            for rec in s.store.expired(now):
                if rec.job_id in s.running:
                    continue
                s.store.delete(rec.job_id)
                s.notify(rec.job_id)
                try:
                    s.remove_files(rec.job_id)
                except Exception:
                    log.exception("job %s: could not remove its files (the sweeper will retry)", rec.job_id)
                s.removed(rec.job_id)
                log.info("job %s: expired and removed", rec.job_id)
                s.emit(rec.job_id, "removed")
                removed += 1
            removed += self._remove_stored_orphans(grace)
        return removed

    def clear_leftovers(self, exclusive: bool) -> int:
        """At start, before any worker runs: orphans. Local leftovers go at once; stored ones too when
        this process owns the store, else (other replicas may be writing) after the usual grace."""
        return self._remove_orphans(grace_s=0.0 if exclusive else self.orphan_grace_s, local_grace_s=0.0)

    def _remove_orphans(self, grace_s: float, local_grace_s: float) -> int:
        removed = self._remove_local_orphans(local_grace_s)
        with self._s.store.exclusive("sweep") as mine:
            if mine:
                removed += self._remove_stored_orphans(grace_s)
        return removed

    def _remove_local_orphans(self, grace_s: float) -> int:
        """Abandoned uploads; with a bucket, also this replica's scratch of jobs it no longer runs."""
        s = self._s
        removed = 0
        with s.files_lock:
            abandoned = [j for j, t in s.uploads.items() if time.monotonic() - t > UPLOAD_TTL_S]
            for job_id in abandoned:  # an API request that died without discard_upload()
                del s.uploads[job_id]
                s.store.release_upload(job_id)
            if s.storage.is_local:
                return removed  # the local directories are the storage: see _remove_stored_orphans
            active = set(s.uploads) | set(s.running)
            for path in s.files.orphans(active, active, min_age_s=grace_s):
                job_id = path.name if path.parent == s.files.root else path.parent.name
                # a worker registers a job in `running` (under s.lock) before it makes the job's scratch:
                # checked again under that lock, a job claimed since `active` was taken keeps its scratch
                with s.lock:
                    if job_id in s.running or job_id in s.uploads:
                        continue
                    try:
                        s.files.remove_orphan(path)
                        removed += 1
                        log.info("removed local scratch %s", path)
                    except OSError:
                        log.exception("could not remove %s", path)
        return removed

    def _remove_stored_orphans(self, grace_s: float) -> int:
        """Stored files of jobs without a record, and leftovers of interrupted writes."""
        s = self._s
        with s.files_lock:
            reserved = s.store.uploads() if s.store.shared else set()
            active = set(s.uploads) | set(s.running) | reserved
            if s.store.shared:  # running on another replica: its partial files are not leftovers
                active |= {r.job_id for r in s.store.list(statuses={JobStatus.processing}, limit=None)}
            try:
                return s.storage.sweep_orphans(_Known(s, reserved), active, grace_s)
            except Exception:
                log.exception("orphan sweep of %s failed", s.storage.description)
                return 0
