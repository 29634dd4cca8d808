"""The job manager's worker: claims jobs from the shared queue, runs them here and records how they ended.

Worker threads ``claim`` the next queued job (admitted by any replica; owners take turns), stage
its stored inputs into local scratch, run the :data:`Executor` with a :class:`JobContext`, store
what it made and then write the outcome, retried, while this replica still holds the job's lease.
A heartbeat thread renews those leases (and the uploads' reservations), stops jobs cancelled or
removed on other replicas, and puts back in the queue the jobs whose lease ran out anywhere
(:meth:`JobWorker.beat`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lipsync_runner.errors import JobCancelledError, JobNotFoundError, LipSyncError
from lipsync_runner.jobs.front import Manager
from lipsync_runner.jobs.records import JobRecord, JobStatus, utcnow
from lipsync_runner.jobs.shared import CANCELLED_MESSAGE, LOG_NAME, Running, SharedState
from lipsync_runner.storage.job_files import is_plain_name, output_name

log = logging.getLogger(LOG_NAME)  # the manager's logger: one for all its parts

INTERNAL_ERROR = "internal error while processing the job"
MISSING_INPUTS = "the job's input files are missing"
PROGRESS_WRITE_INTERVAL_S = 0.5  # at most one progress write per job per interval (plus one per stage change)
FINAL_WRITE_ATTEMPTS = 5  # the record of a finished job is written this many times before giving up


@dataclass
class JobContext:
    """What an executor gets: the record, the job's (local) directory and two callbacks."""

    job: JobRecord
    work_dir: Path
    progress: Callable[[str, float], None]  # (stage, overall fraction 0..1); cheap, throttled by the manager
    should_cancel: Callable[[], bool]  # poll it; raise JobCancelledError when it says True
    jobs: Manager  # the job front, for the records a job refers to (its avatar)
    # progressive output (media/hls.py): store a finished file of the job where every replica reads it,
    # and record how much of it is playable (seconds, whether the playlist has ended)
    publish: Callable[[str, Path], None] | None = None
    note_live: Callable[[float, bool], None] | None = None

    @property
    def video_path(self) -> Path:
        return self.work_dir / self.job.video_file

    @property
    def audio_path(self) -> Path:
        return self.work_dir / self.job.audio_file

    @property
    def output_path(self) -> Path:
        """Where the result should go (write atomically: temp file + rename)."""
        return self.work_dir / output_name(self.job.params.output_format)


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


class JobWorker:
    """The worker threads and the heartbeat of one job manager."""

    def __init__(
        self,
        shared: SharedState,
        execute: Executor,
        jobs: Manager,
        *,
        workers: int,
        max_attempts: int,
        poll_s: float,
        debug: bool,
        final_write_attempts: int = FINAL_WRITE_ATTEMPTS,
        max_running_per_owner: int = 0,
    ) -> None:
        self._s = shared
        self._execute = execute
        self._jobs = jobs  # handed to the executor in each JobContext
        self.workers = workers
        self.max_attempts = max_attempts
        self.poll_s = poll_s  # idle workers look at the shared queue this often
        self.debug = debug  # internal errors' details in the job's error
        self.final_write_attempts = final_write_attempts
        self.max_running_per_owner = max_running_per_owner  # over every replica; 0: no cap (turns still taken)
        # renewals (and cross-replica cancel checks) happen this often: a lease survives two missed beats
        self.heartbeat_s = min(2.0, shared.lease_s / 3)
        self._generation = 0  # bumped by stop(): workers of an older generation exit
        self._threads: list[threading.Thread] = []
        self._heartbeat_thread: threading.Thread | None = None
        self._beat_now = threading.Event()  # wakes the heartbeat early (stop: it may exit)

    # -- lifecycle (the manager calls these under the shared lock) --------------------------

    def start(self) -> None:
        """Start the worker threads, and the heartbeat unless it still beats for jobs that ran on
        after a stop()."""
        generation = self._generation
        self._threads = [
            threading.Thread(target=self._loop, args=(generation,), name=f"job-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()
        if self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(target=self._heartbeat, name="job-heartbeat", daemon=True)
            self._heartbeat_thread.start()

    def stop(self) -> list[threading.Thread]:
        """Tell the worker threads to exit once their job is done; returns them, to be joined.
        The heartbeat is woken (it exits when nothing runs here any more)."""
        with self._s.work:
            self._generation += 1
            self._s.work.notify_all()
            self._beat_now.set()
            threads, self._threads = self._threads, []
        return threads

    def release_if_idle(self) -> None:
        """With no job running here any more: close what close() asked for, the directory lock last."""
        s = self._s
        with s.lock:
            if s.active or s.running:
                return
            closing = s.closing and not s.closed
            s.closed = s.closed or closing
            heartbeat = self._heartbeat_thread
            self._beat_now.set()
        if closing:
            if heartbeat is not None and heartbeat is not threading.current_thread():
                heartbeat.join(self.heartbeat_s + 30)  # its last beat must not meet a closed store
            for what, closer in (("store", s.store.close), ("storage", s.storage.close)):
                try:
                    closer()
                except Exception:
                    log.exception("closing the job %s failed", what)
        with s.lock:
            if not s.active and not s.running:
                s.files.release_lock()

    # -- recovery: jobs nobody runs any more -----------------------------------------------

    def recover(self, exclusive: bool) -> None:
        """At start: re-queue interrupted jobs (all of them when this process owns the store, else those
        whose lease ran out); fail those out of attempts or inputs."""
        s = self._s
        self.requeue_lapsed(everything=exclusive)
        if exclusive:  # queued jobs of a dead process: their inputs must still be there
            for rec in s.store.list(statuses={JobStatus.queued}, limit=None):
                if not self._inputs_present(rec):
                    s.store.update(rec.job_id, **s.finished_fields(JobStatus.failed, utcnow(), error=MISSING_INPUTS))
                    s.emit(rec.job_id, JobStatus.failed.value)

    def requeue_lapsed(self, everything: bool = False) -> None:
        """'processing' jobs nobody holds any more: back to the queue, or failed when out of attempts."""
        s = self._s
        candidates = s.store.list(statuses={JobStatus.processing}, limit=None) if everything else s.store.lapsed()
        for rec in candidates:
            if rec.job_id in s.running:
                continue
            inputs_ok = self._inputs_present(rec)

            def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
                if current.status is not JobStatus.processing or current.job_id in s.running:
                    return None
                lease = current.lease_expires_at
                alive = lease is not None and lease >= now
                if alive and (not everything or current.lease_owner == s.replica_id):
                    return None  # renewed meanwhile (or just claimed by a worker of this process)
                if current.cancel_requested:
                    return s.finished_fields(JobStatus.cancelled, now, error=CANCELLED_MESSAGE)
                if current.attempts < self.max_attempts and inputs_ok:
                    return dict(status=JobStatus.queued, stage="queued", progress=0.0, lease_owner=None,
                                lease_expires_at=None)
                reason = (f"the server stopped while the job was running (attempt {current.attempts} of "
                          f"{self.max_attempts})")
                if not inputs_ok:
                    reason += "; its input files are gone"
                return s.finished_fields(JobStatus.failed, now, error=reason)

            try:
                after = s.store.modify(rec.job_id, change)
            except JobNotFoundError:
                continue
            if after.status is JobStatus.queued:
                log.info("job %s: re-queued after an interrupted attempt %d", rec.job_id, after.attempts)
                s.wake_workers()
            elif after.status.finished:
                log.warning("job %s: %s", rec.job_id, after.error)
            s.notify(rec.job_id)
            if after.status.finished and not rec.status.finished:
                s.emit(rec.job_id, after.status.value)

    def _inputs_present(self, rec: JobRecord) -> bool:
        try:
            return all(self._s.storage.exists(rec.job_id, name)
                       for name in (rec.video_file, rec.audio_file) if name is not None)  # an avatar: no audio
        except (ValueError, LipSyncError):
            return False

    # -- the heartbeat: leases, cross-replica cancels, lapsed jobs -------------------------

    def _heartbeat(self) -> None:
        s = self._s
        while True:
            with s.lock:
                if not s.active and not s.running:
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
        s = self._s
        running = list(s.running)
        held = s.store.renew(s.replica_id, running, s.lease_s)
        for job_id in running:
            run = s.running.get(job_id)
            if run is None:
                continue  # finished meanwhile
            if job_id in held:
                if held[job_id] and not run.cancel.is_set():
                    log.info("job %s: cancelled on another replica", job_id)
                    run.cancel.set()
                continue
            rec = s.store.get(job_id)
            if rec is None:
                run.doomed = True  # cleanup on another replica
            elif rec.status is JobStatus.processing and rec.lease_owner != s.replica_id:
                run.lost = True  # this process stalled past its lease and the job went elsewhere
                log.warning("job %s: lease lost to %s; this attempt stops", job_id, rec.lease_owner)
            else:
                continue  # finished by its own worker between the two reads
            run.cancel.set()
        s.store.renew_uploads(s.replica_id, list(s.uploads), s.lease_s)
        if s.active:
            self.requeue_lapsed()

    # -- running jobs ----------------------------------------------------------------------

    def _loop(self, generation: int) -> None:
        s = self._s
        while True:
            with s.work:
                if self._generation != generation:
                    return
                seen = s.submits
            try:
                rec = s.store.claim(s.replica_id, s.lease_s, self.max_running_per_owner)
            except Exception:
                log.warning("job worker: could not claim a job (retrying)", exc_info=True)
                rec = None
            if rec is None:
                with s.work:
                    if self._generation == generation and s.submits == seen:
                        s.work.wait(self.poll_s)
                continue
            run = Running(rec.job_id)
            with s.lock:
                s.running[rec.job_id] = run
            s.notify(rec.job_id)
            log.info("job %s: processing (attempt %d)", rec.job_id, rec.attempts)
            s.emit(rec.job_id, "started")
            try:
                self._run(rec, run)
            except BaseException:  # never lose a worker to a bug in the bookkeeping
                log.exception("job worker: unexpected error")
                with s.lock:
                    s.running.pop(rec.job_id, None)
                self.release_if_idle()

    def _run(self, rec: JobRecord, run: Running) -> None:
        s = self._s
        job_id = rec.job_id
        outcome_fields: dict[str, object]
        timings: dict[str, float] = {}
        try:
            work_dir = s.files.job_dir(job_id, create=True)
            ctx = JobContext(
                job=rec,
                work_dir=work_dir,
                progress=lambda stage, fraction: self._progress(run, stage, fraction),
                should_cancel=run.cancel.is_set,
                jobs=self._jobs,
                publish=lambda name, path: s.storage.put(job_id, name, path),
                note_live=lambda seconds, ended: self._note_live(run, seconds, ended),
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
                    s.storage.put(job_id, name, work_dir / _kept_name(work_dir, name))
            s.storage.put(job_id, output_file, work_dir / output_file)
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
                self._s.storage.fetch(rec.job_id, name, work_dir / name)
            except FileNotFoundError:
                raise _MissingInputs(MISSING_INPUTS) from None

    def _progress(self, run: Running, stage: str, fraction: float) -> None:
        s = self._s
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
        if self._record_running(run, {"stage": stage, "progress": fraction}, "progress"):
            s.emit(run.job_id, "progress")

    def _note_live(self, run: Running, seconds: float, ended: bool) -> None:
        """Record the playable part of the progressive output (the status shows it on every replica)."""
        if self._record_running(run, {"live": {"seconds": round(float(seconds), 3), "ended": bool(ended)}},
                                "its progressive output"):
            self._s.notify(run.job_id)

    def _record_running(self, run: Running, fields: dict[str, object], what: str) -> bool:
        """Write fields of a job this replica still runs (not after it ended or was taken over); a
        failed write is logged, never raised into the render. True when written."""
        s = self._s

        def change(current: JobRecord, _now: datetime) -> dict[str, object] | None:
            if current.status is not JobStatus.processing or current.lease_owner != s.replica_id:
                return None
            return fields

        try:
            s.store.modify(run.job_id, change)
        except JobNotFoundError:
            return False
        except Exception:
            log.warning("job %s: could not record %s", run.job_id, what, exc_info=True)
            return False
        return True

    # -- the end of a job ------------------------------------------------------------------

    def _finish(self, rec: JobRecord, run: Running, fields: dict[str, object], timings: dict[str, float]) -> None:
        s = self._s
        now = utcnow()
        status = fields.pop("status")
        assert isinstance(status, JobStatus)
        started = rec.started_at or now
        timings["queue_s"] = max(0.0, (started - rec.created_at).total_seconds())
        timings["total_s"] = max(0.0, (now - rec.created_at).total_seconds())
        # lease_owner stays: which worker ran the job is worth knowing afterwards
        final = {**s.finished_fields(status, now, **fields), "timings": timings, "lease_expires_at": None}
        if not run.doomed and not run.lost:
            if not self._write_final(rec.job_id, final):
                run.doomed = run.doomed or self._store_says_gone(rec.job_id)
        try:
            if not run.doomed and not s.storage.is_local:
                s.files.remove(rec.job_id)  # scratch
        except Exception:
            log.exception("job %s: could not remove its scratch (the sweeper will)", rec.job_id)
        # whether it was removed while it ran is read as it leaves `running`, under the lock cleanup
        # marks it with: a cleanup before this leaves the files to this worker, one after removes them
        with s.changed:
            doomed = run.doomed
            s.running.pop(rec.job_id, None)
            s.durations.append(time.monotonic() - run.started)
        if doomed:
            try:
                s.remove_files(rec.job_id)  # removed while it ran: what it stored is an orphan
            except Exception:
                log.exception("job %s: could not remove its files (the sweeper will)", rec.job_id)
            s.removed(rec.job_id)  # what the run itself left here (its avatar refs) outlived the cleanup's hook
        s.notify(rec.job_id)
        self.release_if_idle()
        log.info("job %s: %s%s", rec.job_id, "removed while running" if run.doomed else
                 "given up (lease lost)" if run.lost else status.value,
                 f" ({fields['error']})" if status is not JobStatus.completed and fields.get("error") else "")
        if not run.doomed and not run.lost:
            s.emit(rec.job_id, status.value)

    def _write_final(self, job_id: str, final: dict[str, object]) -> bool:
        """Record the outcome, retried: a lost write would leave the job 'processing' for good.

        Only while this worker still holds the job. If every attempt fails, the job is
        dropped from the heartbeat, its lease runs out and the queue takes it back.
        """
        s = self._s

        def change(current: JobRecord, now: datetime) -> dict[str, object] | None:
            if current.status is not JobStatus.processing or current.lease_owner != s.replica_id:
                raise _NotOurs
            return final

        attempts = self.final_write_attempts
        delay = 0.2
        for attempt in range(1, attempts + 1):
            try:
                s.store.modify(job_id, change)
                return True
            except (JobNotFoundError, _NotOurs):
                return False
            except Exception:
                log.warning("job %s: could not record its end (attempt %d of %d)", job_id, attempt,
                            attempts, exc_info=True)
                time.sleep(delay)
                delay = min(5.0, delay * 2)
        log.error("job %s: its end could not be recorded; the job is re-queued when its lease runs out", job_id)
        return False

    def _store_says_gone(self, job_id: str) -> bool:
        try:
            return self._s.store.get(job_id) is None
        except Exception:
            return False


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
