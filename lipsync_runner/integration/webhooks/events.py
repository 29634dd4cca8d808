"""From job events to outbox rows, and from outbox rows to the job's status.

The job manager calls :meth:`WebhookNotifier.job_event` when a job starts, makes progress
or ends. The notifier decides whether the job wants that event (``webhook_url``,
``webhook_events``), throttles progress, freezes the body and enqueues it:

    body = the job's status body (as GET /status returns it) + event, event_id, event_at

so a receiver parses a delivery exactly like a status response (``lipsync_client.Job``).
A newer progress replaces a queued one, and the job's end drops any queued progress.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Optional

from lipsync_runner.jobs.schemas import WebhookDeliveryStatus, format_time, status_body
from lipsync_runner.jobs.records import JobRecord
from lipsync_runner.params import WebhookEvent
from lipsync_runner.integration.webhooks.outbox import WebhookDelivery, WebhookOutbox

TERMINAL_EVENTS = frozenset({WebhookEvent.completed, WebhookEvent.failed, WebhookEvent.cancelled})


def delivery_body(record: JobRecord, event: WebhookEvent, event_id: str, at: datetime,
                  status_of: Callable[[JobRecord], dict[str, Any]] = status_body) -> str:
    body = {**status_of(record), "event": event.value, "event_id": event_id, "event_at": format_time(at)}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


class WebhookNotifier:
    """Turns job events into outbox rows (thread-safe; cheap when the job has no webhook)."""

    def __init__(self, outbox: WebhookOutbox, *, progress_interval_s: float = 10.0,
                 wake: Optional[Callable[[], None]] = None,
                 status_of: Callable[[JobRecord], dict[str, Any]] = status_body,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.outbox = outbox
        self.progress_interval_s = progress_interval_s
        self.wake = wake or (lambda: None)
        self.status_of = status_of
        self.monotonic = monotonic
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()

    def _progress_due(self, job_id: str) -> bool:
        now = self.monotonic()
        with self._lock:
            last = self._last_progress.get(job_id)
            if last is not None and now - last < self.progress_interval_s:
                return False
            self._last_progress[job_id] = now
            return True

    def job_event(self, record: JobRecord, event: WebhookEvent) -> Optional[WebhookDelivery]:
        """Enqueue ``event`` for ``record`` if the job asked for it; the new outbox row, or None."""
        event = WebhookEvent(event)
        if event in TERMINAL_EVENTS:
            with self._lock:
                self._last_progress.pop(record.job_id, None)
        params = record.params
        if event not in params.selected_webhook_events or params.webhook_url is None:
            return None
        if event is WebhookEvent.progress and not self._progress_due(record.job_id):
            return None
        at = datetime.now(timezone.utc)
        delivery = WebhookDelivery(job_id=record.job_id, owner=record.owner, event=event, url=params.webhook_url,
                                   body="", created_at=at, next_attempt_at=at)
        delivery.body = delivery_body(record, event, delivery.delivery_id, at, self.status_of)
        replaces = (WebhookEvent.progress,) if event is WebhookEvent.progress or event in TERMINAL_EVENTS else ()
        self.outbox.enqueue(delivery, replaces=replaces)
        self.wake()
        return delivery


def delivery_status(d: WebhookDelivery) -> WebhookDeliveryStatus:
    return WebhookDeliveryStatus(event=d.event, event_id=d.delivery_id, state=d.state, attempts=d.attempts,
                                 last_status=d.last_status, last_error=d.last_error,
                                 delivered_at=format_time(d.delivered_at),
                                 next_attempt_at=format_time(d.next_attempt_at) if d.state == "pending" else None)


def deliveries_status(outbox: WebhookOutbox, job_id: str) -> list[dict[str, Any]]:
    """The ``webhooks`` list of a job's status body."""
    return [delivery_status(d).model_dump(mode="json") for d in outbox.for_job(job_id)]
