"""Making webhook deliveries: signed POSTs, retried with exponential back-off for a bounded time.

:class:`WebhookDispatcher` claims due rows from the outbox, POSTs each body with a fresh
signature, and records every attempt's outcome on the row. A 2xx answer delivers it;
anything else (another status, a redirect, a time-out, no connection) schedules the next
attempt ``first_delay_s * factor**(attempts-1)`` later (capped, with jitter so that many
failed deliveries do not return at once) until ``max_age_s`` after the event, then the row
is given up. A receiver address that netguard refuses, or an HTTP 410 (Gone), gives up at
once: retrying cannot change the answer.

One slow receiver must not hold up the others (issue 24):
* an attempt has one deadline, ``webhook_timeout_s`` from its start, for everything: name
  resolution, connect (each address gets only the time left), TLS, sending, and the answer's
  headers. httpx's time-outs are per read, so a receiver that sends a byte a second never trips
  them; a timer shuts the attempt's socket down instead (netguard's ``SocketWatch``);
* attempts run side by side (``webhook_concurrency``), at most ``webhook_per_host`` of them to
  one host name, and the dispatcher never waits for one: it keeps claiming due rows while slow
  ones run. A claimed row whose host is busy waits its turn in memory while its lease leaves
  time for an attempt, then it is let go (not recorded) and comes back due when the lease ends.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional
from urllib.parse import urlsplit

import httpx

from lipsync_runner import __version__
from lipsync_runner.inputs.netguard import (
    AddressPolicy,
    SocketWatch,
    URLRefusedError,
    default_policy,
    guarded_client,
    redact_url,
)
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
STOPPED = "interrupted: the dispatcher stopped"
_RECORD_S = 30.0  # time allowed to record an attempt's outcome, within its lease
_MAX_WAITING = 1024  # claimed rows held for their host's turn; at this many, claiming pauses
_HELD_PER_KEY = 64  # rows held back per host (and per owner): a burst to one receiver waits in memory
_CLAIM_BATCH = 32  # rows claimed per query at least: a backlog of rows that cannot start is passed quickly
_USER_AGENT = {"User-Agent": f"lipsync-runner/{__version__} (webhooks)"}


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


def _host(url: str) -> str:
    """The unit of the per-host bound: the host name (its ports share it, being one machine)."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


class _Cut(Exception):
    """Why a :class:`SocketWatch` stopped an attempt (its deadline, or the dispatcher's stop)."""


@dataclass
class _Claimed:
    delivery: WebhookDelivery
    host: str
    until: float  # monotonic; past it the lease may run out mid-attempt, so the row is let go


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
        self.timeout_s = timeout = self.settings.webhook_timeout_s
        self.slots, self.per_host = self.settings.webhook_concurrency, self.settings.webhook_per_host
        # one tenant's receivers (wildcard DNS gives it any number of host names) get half the slots at most
        self.per_owner = max(1, self.slots // 2)
        # an attempt ends by its deadline; before it, a claimed row may wait up to 3x that for its host's turn
        self.lease_s = 4 * timeout + _RECORD_S
        self._late = f"no answer within {timeout:g} s"
        policy = policy or default_policy(resolve_timeout_s=timeout)
        self.policy = replace(policy, resolve_timeout_s=min(policy.resolve_timeout_s, timeout))  # within the deadline
        self._pool = ThreadPoolExecutor(self.slots, thread_name_prefix="webhook")
        self._lock = threading.Lock()
        self._running: dict[str, Future[Optional[WebhookDelivery]]] = {}  # delivery id -> its attempt
        self._busy: Counter[str] = Counter()  # host, and owner (keys "owner:..."), -> attempts in flight
        self._waiting: dict[str, _Claimed] = {}  # claimed, waiting for their host's turn, oldest first
        self._watches: set[SocketWatch] = set()  # one per attempt in flight
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- one attempt -----------------------------------------------------------------------

    def attempt(self, delivery: WebhookDelivery) -> AttemptResult:
        # a client per attempt, with no connection shared: the watch holds this attempt's socket only
        watch = SocketWatch(deadline=time.monotonic() + self.timeout_s)
        timer = threading.Timer(self.timeout_s, watch.stop, args=(_Cut(self._late),))
        timer.daemon = True
        with self._lock:
            self._watches.add(watch)
            if self._stop.is_set():  # stop() has cut the others already
                watch.stop(_Cut(STOPPED))
        timer.start()
        try:
            return self._post(delivery, watch)
        finally:
            timer.cancel()
            watch.close()
            with self._lock:
                self._watches.discard(watch)

    def _post(self, delivery: WebhookDelivery, watch: SocketWatch) -> AttemptResult:
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
            with guarded_client(self.policy, timeout=httpx.Timeout(self.timeout_s), headers=_USER_AGENT,
                                watch=watch) as client, \
                    client.stream("POST", delivery.url, content=body, headers=headers) as response:
                status = response.status_code
        except URLRefusedError as e:
            return AttemptResult(False, error=e.message, permanent=True)
        except (httpx.HTTPError, _Cut) as e:
            if watch.error is not None:  # whatever the shut socket made httpx say, this is why
                return AttemptResult(False, error=str(watch.error))
            if isinstance(e, httpx.TimeoutException):
                return AttemptResult(False, error=self._late)
            if isinstance(e, httpx.ConnectError):
                return AttemptResult(False, error="could not connect")
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

    def _run(self, delivery: WebhookDelivery, keys: tuple[str, ...]) -> Optional[WebhookDelivery]:
        try:
            if self._stop.is_set():  # claimed as stop() began: not attempted, its lease runs out
                return None
            return self._deliver(delivery)
        except Exception:
            log.exception("webhook delivery %s failed to run (its lease runs out and it comes back)",
                          delivery.delivery_id)
            return None
        finally:
            with self._lock:
                self._running.pop(delivery.delivery_id, None)
                for key in keys:
                    self._busy[key] -= 1
                    if not self._busy[key]:
                        del self._busy[key]
            self._wake.set()  # a slot is free

    # -- passes and the loop ---------------------------------------------------------------

    def _start_or_wait(self, claimed: _Claimed) -> None:
        """Under the lock: start its attempt if a slot, its host and its owner allow; else hold it back,
        a few per host and owner at most. The rest are let go (their lease brings them back due), so one
        host's or one tenant's backlog never fills the hold-back and stops the claims for everyone."""
        owner = claimed.delivery.owner  # None: jobs not scoped to tokens, one tenant: no owner bound
        limits = {claimed.host: self.per_host, **({f"owner:{owner}": self.per_owner} if owner else {})}
        if len(self._running) < self.slots and all(self._busy[k] < b for k, b in limits.items()):
            for key in limits:
                self._busy[key] += 1
            self._running[claimed.delivery.delivery_id] = self._pool.submit(self._run, claimed.delivery,
                                                                            tuple(limits))
            return
        waiting = self._waiting.values()
        if (sum(c.host == claimed.host for c in waiting) < _HELD_PER_KEY
                and (not owner or sum(c.delivery.owner == owner for c in waiting) < _HELD_PER_KEY)):
            self._waiting[claimed.delivery.delivery_id] = claimed

    def _pump(self) -> None:
        """Start every attempt that may start now, waiting for none: rows held back first, then newly
        claimed ones, until the slots are full or nothing is due."""
        with self._lock:
            now = time.monotonic()
            held, self._waiting = self._waiting, {}
            for claimed in held.values():
                if claimed.until > now:  # else let go: its lease runs out and it comes back due
                    self._start_or_wait(claimed)
        while not self._stop.is_set():
            with self._lock:
                room = self.slots - len(self._running)
                if room <= 0 or len(self._waiting) >= _MAX_WAITING:
                    return
            until = time.monotonic() + self.lease_s - self.timeout_s - _RECORD_S  # the lease starts in claim()
            batch = max(room, _CLAIM_BATCH)  # more than the free slots: the extra ones are held back or let go
            rows = self.outbox.claim(self.clock(), batch, self.lease_s)
            with self._lock:
                for row in rows:
                    # a row we still hold can come back only if its lease ran out while recording: skip it
                    if row.delivery_id not in self._running and row.delivery_id not in self._waiting:
                        self._start_or_wait(_Claimed(row, _host(row.url), until))
            if len(rows) < batch:
                return

    def run_once(self) -> list[WebhookDelivery]:
        """Start what is due and wait for those attempts; the rows as recorded (tools and tests: the
        background loop never waits for an attempt)."""
        self._pump()
        with self._lock:
            running = list(self._running.values())
        return [row for future in running if (row := future.result()) is not None]

    def wake(self) -> None:
        """A delivery was enqueued: look now instead of at the next poll."""
        self._wake.set()

    def _wait_s(self) -> float:
        with self._lock:
            if len(self._running) >= self.slots or len(self._waiting) >= _MAX_WAITING:
                return self.poll_s  # nothing more can start until an attempt ends, and that wakes us
        due = self.outbox.next_due()
        if due is None:
            return self.poll_s
        return max(0.0, min(self.poll_s, (due - self.clock()).total_seconds()))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the pass: a wake during it makes the wait below return at once
            try:
                self._pump()
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
        """Stop at once: attempts in flight are cut and recorded (to be retried); rows held back are let go."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            self._waiting.clear()
            watches = list(self._watches)
        for watch in watches:
            watch.stop(_Cut(STOPPED))
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "WebhookDispatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
