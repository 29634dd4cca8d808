"""The webhook outbox: deliveries waiting to be made, kept in the job store.

A job event writes a :class:`WebhookDelivery` (its body frozen at the event) and a
dispatcher delivers it later. Because the row lives in the store, not in memory, a delivery
survives a restart and any replica sharing the store can make it. Claiming is a lease: a
claim moves ``next_attempt_at`` past the attempt's time-out, so another dispatcher takes the
row only if this one died mid-attempt (at-least-once delivery; receivers dedupe on the id).

:class:`WebhookOutbox` is the part a job store implements; :class:`SQLiteWebhookOutbox` is the
SQLite one, ``jobs.postgres_integration.PostgresWebhookOutbox`` the PostgreSQL one (its claim
is ``FOR UPDATE SKIP LOCKED`` on the due rows; the other methods are single statements).
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Optional, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from lipsync_runner.params import WebhookEvent
from lipsync_runner.jobs.sqlite_file import open_sqlite


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class WebhookDelivery(BaseModel):
    """One event for one job, to one URL, and what became of it."""

    delivery_id: str = Field(default_factory=lambda: str(uuid.uuid4()))  # also the event id receivers see
    job_id: str
    owner: Optional[str] = None
    event: WebhookEvent
    url: str
    body: str  # the JSON text, frozen when the event happened (the signature is made per attempt)
    created_at: datetime = Field(default_factory=_utcnow)
    next_attempt_at: Optional[datetime] = Field(default_factory=_utcnow)  # None once delivered or given up
    attempts: int = 0
    last_attempt_at: Optional[datetime] = None
    last_status: Optional[int] = None  # the receiver's HTTP status; None: no answer (see last_error)
    last_error: Optional[str] = None
    delivered_at: Optional[datetime] = None
    failed_at: Optional[datetime] = None  # gave up: out of time, or a permanent refusal

    @property
    def state(self) -> Literal["pending", "delivered", "failed"]:
        if self.delivered_at is not None:
            return "delivered"
        return "failed" if self.failed_at is not None else "pending"


@runtime_checkable
class WebhookOutbox(Protocol):
    """Webhook deliveries in the job store, safe to use from several threads and processes.

    * ``enqueue(delivery, replaces=())``: add it; in the same transaction remove this job's
      pending deliveries of the events in ``replaces`` (a newer progress, or the job's end,
      makes a queued progress stale).
    * ``claim(now, limit, lease_s)``: up to ``limit`` pending deliveries due at ``now``, oldest
      due first, each with ``next_attempt_at`` moved to ``now + lease_s`` so that no other
      dispatcher takes it meanwhile.
    * ``record_attempt(delivery_id, at=, status=, error=, delivered=, next_attempt_at=)``:
      one attempt's outcome (``attempts`` + 1). Not delivered and ``next_attempt_at=None``
      means given up. Returns the new row, or None if it was removed meanwhile.
    * ``for_job(job_id)``: its deliveries, oldest first (for the job's status).
    * ``next_due()``: the earliest ``next_attempt_at`` of a pending delivery, or None.
    * ``delete_job(job_id)``: remove its deliveries (cleanup, expiry).
    """

    def enqueue(self, delivery: WebhookDelivery, replaces: Collection[WebhookEvent] = ()) -> WebhookDelivery: ...

    def claim(self, now: datetime, limit: int, lease_s: float) -> list[WebhookDelivery]: ...

    def record_attempt(self, delivery_id: str, *, at: datetime, status: Optional[int], error: Optional[str],
                       delivered: bool, next_attempt_at: Optional[datetime]) -> Optional[WebhookDelivery]: ...

    def for_job(self, job_id: str) -> list[WebhookDelivery]: ...

    def next_due(self) -> Optional[datetime]: ...

    def delete_job(self, job_id: str) -> None: ...

    def close(self) -> None: ...


def _ts(value: Optional[datetime]) -> Optional[float]:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _dt(value: Optional[float]) -> Optional[datetime]:
    return None if value is None else datetime.fromtimestamp(value, timezone.utc)


_COLUMNS = ("delivery_id", "job_id", "owner", "event", "url", "body", "created_at", "next_attempt_at", "attempts",
            "last_attempt_at", "last_status", "last_error", "delivered_at", "failed_at")
_TIME_COLUMNS = frozenset({"created_at", "next_attempt_at", "last_attempt_at", "delivered_at", "failed_at"})

# Kept next to the jobs table; CREATE ... IF NOT EXISTS so it can share the job store's file.
SCHEMA = """
    CREATE TABLE IF NOT EXISTS webhook_deliveries (
        delivery_id     TEXT PRIMARY KEY,
        job_id          TEXT NOT NULL,
        owner           TEXT,
        event           TEXT NOT NULL,
        url             TEXT NOT NULL,
        body            TEXT NOT NULL,
        created_at      REAL NOT NULL,
        next_attempt_at REAL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        last_attempt_at REAL,
        last_status     INTEGER,
        last_error      TEXT,
        delivered_at    REAL,
        failed_at       REAL
    );
    CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
        WHERE next_attempt_at IS NOT NULL;
    CREATE INDEX IF NOT EXISTS webhook_deliveries_job ON webhook_deliveries (job_id, created_at);
"""


class SQLiteWebhookOutbox:
    """:class:`WebhookOutbox` in a SQLite file (the job store's, or its own); WAL, one connection per instance.

    Several instances (processes) may use one file: claims run in ``BEGIN IMMEDIATE``
    transactions, so two dispatchers never claim the same row.
    """

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: Optional[sqlite3.Connection] = open_sqlite(self.path, SCHEMA, busy_timeout_ms=busy_timeout_ms,
                                                               synchronous="NORMAL")

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the webhook outbox is closed")
        return self._conn

    @staticmethod
    def _row(delivery: WebhookDelivery) -> tuple[object, ...]:
        data = delivery.model_dump(mode="python")
        data["event"] = delivery.event.value
        return tuple(_ts(data[c]) if c in _TIME_COLUMNS else data[c] for c in _COLUMNS)

    @staticmethod
    def _from_row(row: tuple[object, ...]) -> WebhookDelivery:
        data = dict(zip(_COLUMNS, row, strict=True))
        for c in _TIME_COLUMNS:
            data[c] = _dt(data[c])  # type: ignore[arg-type]
        return WebhookDelivery.model_validate(data)

    def _transaction(self):
        return _Transaction(self._db(), self._lock)

    def enqueue(self, delivery: WebhookDelivery, replaces: Collection[WebhookEvent] = ()) -> WebhookDelivery:
        stale = sorted({WebhookEvent(e).value for e in replaces})
        with self._transaction() as db:
            if stale:
                db.execute(
                    f"DELETE FROM webhook_deliveries WHERE job_id = ? AND delivered_at IS NULL AND failed_at IS NULL "
                    f"AND event IN ({', '.join('?' * len(stale))})", (delivery.job_id, *stale))
            db.execute(f"INSERT INTO webhook_deliveries ({', '.join(_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_COLUMNS))})", self._row(delivery))
        return delivery

    def claim(self, now: datetime, limit: int, lease_s: float) -> list[WebhookDelivery]:
        lease_until = _ts(now) + float(lease_s)  # type: ignore[operator]
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL "
                f"AND next_attempt_at <= ? ORDER BY next_attempt_at, created_at LIMIT ?",
                (_ts(now), max(0, int(limit)))).fetchall()
            db.executemany("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE delivery_id = ?",
                           [(lease_until, row[0]) for row in rows])
        claimed = [self._from_row(row) for row in rows]
        for d in claimed:
            d.next_attempt_at = _dt(lease_until)
        return claimed

    def record_attempt(self, delivery_id: str, *, at: datetime, status: Optional[int], error: Optional[str],
                       delivered: bool, next_attempt_at: Optional[datetime]) -> Optional[WebhookDelivery]:
        with self._transaction() as db:
            db.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = ?, last_status = ?, "
                "last_error = ?, delivered_at = ?, failed_at = ?, next_attempt_at = ? WHERE delivery_id = ?",
                (_ts(at), status, error, _ts(at) if delivered else None,
                 _ts(at) if not delivered and next_attempt_at is None else None,
                 None if delivered else _ts(next_attempt_at), delivery_id))
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM webhook_deliveries WHERE delivery_id = ?",
                             (delivery_id,)).fetchone()
        return self._from_row(row) if row else None

    def for_job(self, job_id: str) -> list[WebhookDelivery]:
        with self._lock:
            rows = self._db().execute(
                f"SELECT {', '.join(_COLUMNS)} FROM webhook_deliveries WHERE job_id = ? ORDER BY created_at, rowid",
                (job_id,)).fetchall()
        return [self._from_row(row) for row in rows]

    def next_due(self) -> Optional[datetime]:
        with self._lock:
            (value,) = self._db().execute(
                "SELECT MIN(next_attempt_at) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL").fetchone()
        return _dt(value)

    def delete_job(self, job_id: str) -> None:
        with self._lock:
            self._db().execute("DELETE FROM webhook_deliveries WHERE job_id = ?", (job_id,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) under the instance's lock."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self.conn, self.lock = conn, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()
