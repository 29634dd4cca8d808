"""What a platform integrating from its own pipeline gets around each job (issue 14).

    admission  -> check_params (URLs, webhook secret), the Idempotency-Key reservations (keys)
    job events -> on_job_event (the job manager's on_event hook): webhooks, usage, job logs
    status     -> status_extras: queue_position, eta_s, webhooks (each delivery's outcome)
    usage      -> usage(owner, since, until)

One object, built by ApiCore from the settings and shared by admission, the operations and
the job manager's hook, so each surface gets the same behaviour. Its tables sit behind the
store protocols (``WebhookOutbox``, ``IdempotencyStore``, ``UsageLedger``): by default in their
own SQLite file, ``<data dir>/integration.sqlite3``; with ``LIP_SYNC_DATABASE_URL``, ApiCore
passes the PostgreSQL versions (jobs/postgres_integration.py), in the job database that every
replica shares (docs/integration.md, "For store implementers").
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional, Protocol


from lipsync_runner.errors import InvalidInputError
from lipsync_runner.integration.idempotency import (
    IdempotencyKeys,
    IdempotencyStore,
    SQLiteIdempotencyStore,
    expiry_cutoff,
)
from lipsync_runner.config import FetchSettings
from lipsync_runner.inputs.fetch import S3Reader
from lipsync_runner.jobs.eta import Estimate, claim_order, estimate_from_records
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus
from lipsync_runner.jobs.schemas import JobStatusResponse
from lipsync_runner.jobs.logs import log_job_event
from lipsync_runner.inputs.netguard import AddressPolicy, URLRefusedError, default_policy
from lipsync_runner.params import JobParams, WebhookEvent
from lipsync_runner.integration.usage import SQLiteUsageLedger, UsageLedger, account_job, default_window
from lipsync_runner.integration.webhooks import (
    SQLiteWebhookOutbox,
    WebhookDispatcher,
    WebhookNotifier,
    WebhookOutbox,
    deliveries_status,
)
from lipsync_runner.config import WebhookSettings
from lipsync_runner.integration.webhooks.events import TERMINAL_EVENTS
from lipsync_runner.config import IntegrationSettings, OutboundSettings

log = logging.getLogger("lipsync_runner.jobs.events")

DB_NAME = "integration.sqlite3"
SCRATCH_DIR = "scratch"  # bodies read only to be compared (an idempotent replay), never kept
ETA_CACHE_S = 1.0  # status polls of many clients share one look at the queue
MAX_USAGE_DAYS = 366
_WEBHOOK_EVENTS = {e.value: e for e in WebhookEvent}


class JobRecords(Protocol):
    """The job store as integration reads it: a record by id (any owner), and lists for the ETA."""

    def get(self, job_id: str) -> JobRecord | None: ...
    def list(self, **filters: Any) -> list[JobRecord]: ...


class Integration:
    """Webhooks, Idempotency-Key, usage, URL-input policy and queue ETA, around the job store."""

    def __init__(self, data_dir: Path, *, records: JobRecords, download_url: Callable[[str], str], workers: int,
                 settings: IntegrationSettings | None = None,
                 webhooks: WebhookSettings | None = None, fetch: FetchSettings | None = None,
                 outbound: OutboundSettings | None = None, policy: AddressPolicy | None = None,
                 s3_reader: S3Reader | None = None,
                 outbox: WebhookOutbox | None = None, key_store: IdempotencyStore | None = None,
                 ledger: UsageLedger | None = None) -> None:
        data_dir = Path(data_dir)
        db = data_dir / DB_NAME
        self.settings = settings or IntegrationSettings()
        self.webhooks = webhooks or WebhookSettings()
        self.fetch = fetch or FetchSettings()
        # one allow-list (LIP_SYNC_URL_ALLOWLIST) for inputs and webhooks
        self.policy = policy or default_policy(resolve_timeout_s=self.fetch.url_connect_timeout_s, outbound=outbound)
        self.s3_reader = s3_reader
        self.workers = workers
        self.outbox = outbox or SQLiteWebhookOutbox(db)
        self.key_store = key_store or SQLiteIdempotencyStore(db)
        self.keys = IdempotencyKeys(self.key_store, ttl_s=self.settings.idempotency_ttl_hours * 3600)
        self.ledger = ledger or SQLiteUsageLedger(db)
        self.scratch_dir = data_dir / SCRATCH_DIR
        self.dispatcher = (WebhookDispatcher(self.outbox, self.webhooks, policy=policy or default_policy(
                               resolve_timeout_s=self.webhooks.webhook_timeout_s, outbound=outbound))
                           if self.webhooks.secrets else None)
        self.notifier = WebhookNotifier(self.outbox, progress_interval_s=self.webhooks.webhook_progress_interval_s,
                                        wake=self.dispatcher.wake if self.dispatcher else None,
                                        status_of=self.status_body)
        self.records = records
        self.download_url = download_url
        self._lock = threading.Lock()
        self._wants_progress: dict[str, bool] = {}  # job id -> its webhook wants progress events
        self._output_fps: dict[str, Fraction] = {}  # job id -> fps of its result, noted by the worker
        self._eta: tuple[float, dict[str, Estimate]] = (float("-inf"), {})
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        shutil.rmtree(self.scratch_dir, ignore_errors=True)
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        dropped = self.key_store.release_pending()  # no upload survives a restart (with leases: dead holders')
        if dropped:
            log.info("released %d Idempotency-Key reservation(s) of uploads a previous run did not finish", dropped)
        lease_s = self.key_store.lease_s
        if lease_s and self._renewer is None:  # a shared store: our uploads' keys live while we renew them
            self._stop.clear()
            self._renewer = threading.Thread(target=self._renew_keys, args=(min(2.0, lease_s / 3),),
                                             name="idempotency-leases", daemon=True)
            self._renewer.start()
        now = datetime.now(timezone.utc)
        self.key_store.purge(expiry_cutoff(now, self.keys.ttl_s))
        self.ledger.purge(now - timedelta(days=self.settings.usage_retention_days))
        if self.dispatcher is not None:
            self.dispatcher.start()
        elif self.outbox.next_due() is not None:
            log.warning("webhook deliveries are waiting but LIP_SYNC_WEBHOOK_SECRET is not set: none is sent "
                        "until it is")

    def stop(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(10)
            self._renewer = None
        if self.dispatcher is not None:
            self.dispatcher.stop()
        for store in (self.outbox, self.key_store, self.ledger):
            store.close()

    def _renew_keys(self, every_s: float) -> None:
        """Renew the leases of the Idempotency-Key reservations whose uploads stream into this replica."""
        while not self._stop.wait(every_s):
            try:
                self.keys.renew()
            except Exception:
                log.warning("could not renew Idempotency-Key reservations (retrying)", exc_info=True)

    # ------------------------------------------------------------------ admission

    def check_params(self, params: JobParams) -> None:
        """Refuse at once what can be judged without DNS; names are vetted at every connection later.

        Resolving here would slow every request and prove nothing about the connection the
        worker makes minutes later (a name can change its answer): the worker and the
        dispatcher resolve, and check, each time they connect.
        """
        if params.webhook_url is not None:
            if not self.webhooks.secrets:
                raise InvalidInputError(
                    "webhook_url: this server cannot sign webhooks (LIP_SYNC_WEBHOOK_SECRET is not set), so it does "
                    "not send them; leave webhook_url out and poll the job's status instead")
            self.policy.check_url(params.webhook_url, "webhook_url")
        for field in ("video_url", "audio_url"):
            url = getattr(params, field)
            if url is None:
                continue
            if url.lower().startswith("s3://"):
                if self.s3_reader is None:
                    raise URLRefusedError(f"{field}: s3:// URLs need object storage to be configured on the server; "
                                          "give an http(s) URL (a presigned URL works)")
                continue
            self.policy.check_url(url, field)

    # ------------------------------------------------------------------ status

    def _estimates(self, refresh: bool = False) -> dict[str, Estimate]:
        now = time.monotonic()
        with self._lock:
            at, cached = self._eta
            if not refresh and now - at < ETA_CACHE_S:
                return cached
        running = self.records.list(statuses={JobStatus.processing}, limit=None)
        # in the order the workers will take them: owners take turns (jobs/sql.py's claim)
        queued = claim_order(self.records.list(statuses={JobStatus.queued}, limit=None), running)
        recent = self.records.list(statuses={JobStatus.completed}, limit=self.settings.eta_history_jobs)
        frames = {r.job_id: n for r in (*queued, *running) if (n := expected_frames(r)) is not None}
        estimates = estimate_from_records(queued, running, recent, self.workers, datetime.now(timezone.utc), frames)
        with self._lock:
            self._eta = (now, estimates)
        return estimates

    def status_extras(self, record: JobRecord) -> dict[str, Any]:
        """``queue_position`` and ``eta_s`` while the job waits or runs; ``webhooks`` when it has one."""
        extras: dict[str, Any] = {}
        if not record.status.finished:
            estimates = self._estimates()
            if record.job_id not in estimates:  # newer than the cached look at the queue
                estimates = self._estimates(refresh=True)
            estimate = estimates.get(record.job_id)
            if estimate is not None:
                extras["eta_s"] = estimate.eta_s
                if record.status is JobStatus.queued:
                    extras["queue_position"] = estimate.queue_position
        if record.params.webhook_url is not None:
            extras["webhooks"] = deliveries_status(self.outbox, record.job_id)
        return extras

    def status_body(self, record: JobRecord) -> dict[str, Any]:
        """GET /status's body (also each webhook's): the record, its download URL, the queue and the outbox."""
        return JobStatusResponse.from_record(record, self.download_url(record.job_id),
                                             **self.status_extras(record)).model_dump(mode="json")

    # ------------------------------------------------------------------ job events

    def note_output(self, job_id: str, fps: Fraction) -> None:
        """The worker's word on the result's frame rate (for the usage ledger's seconds)."""
        with self._lock:
            self._output_fps[job_id] = Fraction(fps)

    def on_job_event(self, job_id: str, event: str) -> None:
        """The job manager's ``on_event`` hook: logs, usage and webhooks for one event."""
        if event == "removed":
            with self._lock:
                self._wants_progress.pop(job_id, None)
                self._output_fps.pop(job_id, None)
            # the job is gone: so are its undelivered webhooks and its key (documented)
            self.outbox.delete_job(job_id)
            self.key_store.forget_job(job_id)
            log.info("job %s: removed", job_id, extra={"event": "removed", "job_id": job_id})
            return
        if event == "progress" and self._wants_progress.get(job_id) is False:
            return  # the cheap path: twice a second per running job
        record = self.records.get(job_id)
        if record is None:
            return
        wants = WebhookEvent.progress in record.params.selected_webhook_events
        if event != "progress":
            log_job_event(log, record, event)
        terminal = _WEBHOOK_EVENTS.get(event) in TERMINAL_EVENTS
        with self._lock:
            if terminal:
                self._wants_progress.pop(job_id, None)
                fps = self._output_fps.pop(job_id, None)
            else:
                self._wants_progress[job_id] = wants
                fps = None
        if terminal and record.status.finished and record.kind is JobKind.job:  # an avatar is no output
            account_job(self.ledger, record, output_seconds(record, fps))
        webhook_event = _WEBHOOK_EVENTS.get(event)
        if webhook_event is not None:
            self.notifier.job_event(record, webhook_event)

    # ------------------------------------------------------------------ usage

    def usage(self, owner: Optional[str], since: Optional[date] = None, until: Optional[date] = None) -> dict[str, Any]:
        """The owner's usage by UTC day; the last 30 days by default."""
        if since is None and until is None:
            since, until = default_window()
        elif since is None:
            since = until - timedelta(days=29)
        elif until is None:
            until = datetime.now(timezone.utc).date()
        if since > until:
            raise InvalidInputError("Invalid usage range: since is after until")
        if (until - since).days >= MAX_USAGE_DAYS:
            raise InvalidInputError(f"Invalid usage range: at most {MAX_USAGE_DAYS} days at once")
        return self.ledger.summary(owner, since, until).model_dump(mode="json")


def _fps(record: JobRecord) -> Optional[Fraction]:
    text = ((record.media or {}).get("video") or {}).get("fps")
    try:
        fps = Fraction(str(text)) if text else None
    except (ValueError, ZeroDivisionError):
        return None
    return fps if fps and fps > 0 else None


def expected_frames(record: JobRecord) -> Optional[int]:
    """Output frames of a job before it runs: the audio's length at the video's frame rate."""
    fps = _fps(record)
    duration = ((record.media or {}).get("audio") or {}).get("duration_s")
    if fps is None or not duration:
        return None
    return max(1, int(float(duration) * fps))


def output_seconds(record: JobRecord, fps: Optional[Fraction] = None) -> float:
    """Seconds of video a finished job wrote: its frames at the result's frame rate (0 without a result)."""
    fps = fps or _fps(record)
    if record.status is not JobStatus.completed or not record.frames or not fps:
        return 0.0
    return round(float(record.frames / fps), 3)
