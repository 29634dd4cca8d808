"""Making webhook deliveries: signed POSTs, retried with exponential back-off for a bounded time.

:class:`WebhookDispatcher` claims due rows from the outbox, POSTs each body with a fresh
signature, and records every attempt's outcome on the row. A 2xx answer delivers it;
anything else (another status, a redirect, a time-out, no connection) schedules the next
attempt ``first_delay_s * factor**(attempts-1)`` later (capped, with jitter so that many
failed deliveries do not return at once) until ``max_age_s`` after the event, then the row
is given up. A receiver address that netguard refuses, or an HTTP 410 (Gone), gives up at
once: retrying cannot change the answer.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

import httpx

from lipsync_runner import __version__
from lipsync_runner.inputs.netguard import AddressPolicy, URLRefusedError, default_policy, guarded_client, redact_url
from lipsync_runner.integration.webhooks.outbox import WebhookDelivery, WebhookOutbox
from lipsync_runner.integration.webhooks.signing import (
    EVENT_HEADER,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    signature_header,
)
from lipsync_runner.config import WebhookSettings

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "Lipsync-Attempt"


@dataclass(frozen=True)
class RetryPolicy:
    first_delay_s: float = 5.0
    factor: float = 2.0
    max_delay_s: float = 3600.0
    max_age_s: float = 24 * 3600.0
    jitter: float = 0.2  # each delay is shortened by up to this fraction, at random

    def delay_s(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failed attempt (1, 2, ...)."""
        base = min(self.max_delay_s, self.first_delay_s * self.factor ** max(0, attempts - 1))
        return base * (1.0 - self.jitter * random.random())

    def next_attempt(self, delivery: WebhookDelivery, attempts: int, now: datetime) -> Optional[datetime]:
        """When to try again after ``attempts`` failures; None when the delivery is out of time."""
        at = now + timedelta(seconds=self.delay_s(attempts))
        return at if at <= delivery.created_at + timedelta(seconds=self.max_age_s) else None


@dataclass(frozen=True)
class AttemptResult:
    delivered: bool
    status: Optional[int] = None
    error: Optional[str] = None
    permanent: bool = False  # retrying cannot help


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def retry_policy(settings: WebhookSettings) -> RetryPolicy:
    return RetryPolicy(first_delay_s=settings.webhook_retry_first_s, max_delay_s=settings.webhook_retry_max_s,
                       max_age_s=settings.webhook_max_age_hours * 3600)


class WebhookDispatcher:
    """Delivers due outbox rows, in a background thread (``start``/``stop``) or one pass at a time (``run_once``)."""

    def __init__(self, outbox: WebhookOutbox, settings: Optional[WebhookSettings] = None, *,
                 policy: Optional[AddressPolicy] = None, retry: Optional[RetryPolicy] = None,
                 poll_s: float = 1.0, clock: Callable[[], datetime] = _utcnow) -> None:
        self.outbox = outbox
        self.settings = settings or WebhookSettings()
        self.secrets = self.settings.secrets
        if not self.secrets:
            raise ValueError("webhook deliveries need a signing secret: set LIP_SYNC_WEBHOOK_SECRET")
        self.retry = retry or retry_policy(self.settings)
        self.poll_s = poll_s  # also the longest a row enqueued by another process waits to be seen
        self.clock = clock
        timeout = self.settings.webhook_timeout_s
        self.lease_s = 4 * timeout + 30  # connect + write + read + pool phases, with room to record the outcome
        self._client = guarded_client(policy or default_policy(resolve_timeout_s=self.settings.webhook_timeout_s), timeout=httpx.Timeout(timeout),
                                      follow_redirects=False,
                                      headers={"User-Agent": f"lipsync-runner/{__version__} (webhooks)"})
        self._pool = ThreadPoolExecutor(self.settings.webhook_concurrency, thread_name_prefix="webhook")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- one attempt -----------------------------------------------------------------------

    def attempt(self, delivery: WebhookDelivery) -> AttemptResult:
        body = delivery.body.encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(body, self.secrets, int(time.time())),
            EVENT_HEADER: delivery.event.value,
            EVENT_ID_HEADER: delivery.delivery_id,
            ATTEMPT_HEADER: str(delivery.attempts + 1),
        }
        try:
            # the answer's body is never read: a receiver cannot make us hold megabytes
            with self._client.stream("POST", delivery.url, content=body, headers=headers) as response:
                status = response.status_code
        except URLRefusedError as e:
            return AttemptResult(False, error=e.message, permanent=True)
        except httpx.TimeoutException:
            return AttemptResult(False, error=f"no answer within {self.settings.webhook_timeout_s:g} s")
        except httpx.ConnectError:
            return AttemptResult(False, error="could not connect")
        except httpx.HTTPError as e:
            return AttemptResult(False, error=f"request failed ({type(e).__name__})")
        if 200 <= status < 300:
            return AttemptResult(True, status)
        if 300 <= status < 400:
            return AttemptResult(False, status, "redirects are not followed", permanent=False)
        return AttemptResult(False, status, f"HTTP {status}", permanent=status == 410)

    def _deliver(self, delivery: WebhookDelivery) -> Optional[WebhookDelivery]:
        result = self.attempt(delivery)
        now = self.clock()
        attempts = delivery.attempts + 1
        next_at = None if result.delivered or result.permanent else self.retry.next_attempt(delivery, attempts, now)
        row = self.outbox.record_attempt(delivery.delivery_id, at=now, status=result.status, error=result.error,
                                         delivered=result.delivered, next_attempt_at=next_at)
        where = redact_url(delivery.url)
        if result.delivered:
            log.info("webhook %s for job %s delivered to %s (attempt %d)", delivery.event.value, delivery.job_id,
                     where, attempts)
        elif next_at is None:
            log.warning("webhook %s for job %s to %s given up after %d attempt(s): %s", delivery.event.value,
                        delivery.job_id, where, attempts, result.error)
        return row

    # -- passes and the loop ---------------------------------------------------------------

    def run_once(self) -> list[WebhookDelivery]:
        """Claim what is due and attempt it; the rows as recorded afterwards."""
        claimed = self.outbox.claim(self.clock(), self.settings.webhook_concurrency, self.lease_s)
        rows = list(self._pool.map(self._deliver, claimed))
        return [r for r in rows if r is not None]

    def wake(self) -> None:
        """A delivery was enqueued: look now instead of at the next poll."""
        self._wake.set()

    def _wait_s(self) -> float:
        due = self.outbox.next_due()
        if due is None:
            return self.poll_s
        return max(0.0, min(self.poll_s, (due - self.clock()).total_seconds()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the pass: a wake during it makes the wait below return at once
            try:
                if self.run_once():
                    continue
                wait = self._wait_s()
            except Exception:
                log.exception("webhook dispatcher: pass failed (retrying)")
                wait = self.poll_s
            self._wake.wait(wait)

    def start(self) -> "WebhookDispatcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="webhook-dispatcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self) -> "WebhookDispatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
