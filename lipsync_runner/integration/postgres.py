"""The integration tables in PostgreSQL: webhook outbox, Idempotency-Key reservations, usage ledger.

The PostgreSQL versions of :class:`~lipsync_runner.integration.webhooks.outbox.WebhookOutbox`,
:class:`~lipsync_runner.integration.idempotency.IdempotencyStore` and
:class:`~lipsync_runner.integration.usage.UsageLedger`, used by ApiCore when ``LIP_SYNC_DATABASE_URL`` is
set. They live in the job database and share the job store's pool (an unreachable database
is the same 503) and its migrations (``MIGRATIONS[3]`` in :mod:`.postgres`). The pool belongs
to the job store: ``close()`` here does nothing, the store closes it.

Clocks: claims and leases use the database's clock (``clock_timestamp()``), never a
replica's, as the job leases do. Replicas' clocks differ; a fast one would take a webhook
delivery another replica still holds (a duplicate), or a key reservation whose upload is
still streaming. The ``now`` arguments of the protocols are for SQLite's (test) clock.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import date, datetime
from typing import Optional

from lipsync_runner.integration.idempotency import KeyRecord
from lipsync_runner.params import WebhookEvent
from lipsync_runner.integration.usage import UsageEntry, UsageSummary, summarize_days
from lipsync_runner.integration.webhooks.outbox import WebhookDelivery
from lipsync_runner.jobs.postgres import PostgresJobStore
from lipsync_runner.jobs.records import JobStatus

_DELIVERY_COLUMNS = ("delivery_id", "job_id", "owner", "event", "url", "body", "created_at", "next_attempt_at",
                     "attempts", "last_attempt_at", "last_status", "last_error", "delivered_at", "failed_at")
# uuid comes back as text: the model's id is a string
_DELIVERY_SELECT = ", ".join("w.delivery_id::text" if c == "delivery_id" else f"w.{c}" for c in _DELIVERY_COLUMNS)


def _delivery(row: tuple) -> WebhookDelivery:
    return WebhookDelivery.model_validate(dict(zip(_DELIVERY_COLUMNS, row, strict=True)))


class PostgresWebhookOutbox:
    """:class:`WebhookOutbox` in PostgreSQL: every replica's dispatcher claims from one table.

    A claim is the row lock: ``FOR UPDATE SKIP LOCKED`` picks due rows nobody else is
    claiming, and moving ``next_attempt_at`` past the attempt's lease (database clock)
    keeps them out of the next claims, so two replicas never take one row.
    """

    def __init__(self, store: PostgresJobStore) -> None:
        self.store = store

    def enqueue(self, delivery: WebhookDelivery, replaces: Collection[WebhookEvent] = ()) -> WebhookDelivery:
        stale = sorted({WebhookEvent(e).value for e in replaces})
        d = delivery
        with self.store.transaction() as conn:
            if stale:
                conn.execute("DELETE FROM webhook_deliveries WHERE job_id = %s AND delivered_at IS NULL "
                             "AND failed_at IS NULL AND event = ANY(%s)", (d.job_id, stale))
            conn.execute(
                f"INSERT INTO webhook_deliveries ({', '.join(_DELIVERY_COLUMNS)}) "
                f"VALUES (%s::uuid, {', '.join(['%s'] * (len(_DELIVERY_COLUMNS) - 1))})",
                (d.delivery_id, d.job_id, d.owner, d.event.value, d.url, d.body, d.created_at, d.next_attempt_at,
                 d.attempts, d.last_attempt_at, d.last_status, d.last_error, d.delivered_at, d.failed_at))
        return delivery

    def claim(self, now: datetime, limit: int, lease_s: float) -> list[WebhookDelivery]:
        """Due rows by the database's clock (``now`` is not used: see the module)."""
        with self.store.connection() as conn:
            rows = conn.execute(
                f"""WITH t AS (SELECT clock_timestamp() AS now),
                        due AS (SELECT delivery_id, next_attempt_at AS due_at FROM webhook_deliveries, t
                                WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= t.now
                                ORDER BY next_attempt_at, created_at LIMIT %s
                                FOR UPDATE OF webhook_deliveries SKIP LOCKED)
                    UPDATE webhook_deliveries w SET next_attempt_at = t.now + make_interval(secs => %s)
                    FROM due, t WHERE w.delivery_id = due.delivery_id
                    RETURNING due.due_at, {_DELIVERY_SELECT}""",
                (max(0, int(limit)), float(lease_s))).fetchall()
        rows.sort(key=lambda row: (row[0], row[1 + _DELIVERY_COLUMNS.index("created_at")]))
        return [_delivery(row[1:]) for row in rows]

    def record_attempt(self, delivery_id: str, *, at: datetime, status: Optional[int], error: Optional[str],
                       delivered: bool, next_attempt_at: Optional[datetime]) -> Optional[WebhookDelivery]:
        # the back-off the dispatcher chose, counted on the database's clock like the claims
        retry_in = None if delivered or next_attempt_at is None else max(0.0, (next_attempt_at - at).total_seconds())
        with self.store.connection() as conn:
            row = conn.execute(
                f"""UPDATE webhook_deliveries w SET attempts = attempts + 1, last_attempt_at = %s, last_status = %s,
                        last_error = %s, delivered_at = %s, failed_at = %s,
                        next_attempt_at = clock_timestamp() + make_interval(secs => %s)
                    WHERE delivery_id = %s::uuid RETURNING {_DELIVERY_SELECT}""",
                (at, status, error, at if delivered else None,
                 at if not delivered and next_attempt_at is None else None, retry_in, delivery_id)).fetchone()
        return _delivery(row) if row else None

    def for_job(self, job_id: str) -> list[WebhookDelivery]:
        with self.store.connection() as conn:
            rows = conn.execute(f"SELECT {_DELIVERY_SELECT} FROM webhook_deliveries w WHERE job_id = %s "
                                "ORDER BY created_at, delivery_id", (job_id,)).fetchall()
        return [_delivery(row) for row in rows]

    def next_due(self) -> Optional[datetime]:
        with self.store.connection() as conn:
            (value,) = conn.execute("SELECT min(next_attempt_at) FROM webhook_deliveries "
                                    "WHERE next_attempt_at IS NOT NULL").fetchone()
        return value

    def delete_job(self, job_id: str) -> None:
        with self.store.connection() as conn:
            conn.execute("DELETE FROM webhook_deliveries WHERE job_id = %s", (job_id,))

    def close(self) -> None:
        """Nothing: the pool is the job store's (closed with it)."""


class PostgresIdempotencyStore:
    """:class:`IdempotencyStore` in PostgreSQL, shared by every replica.

    A pending reservation has a ``holder`` (the replica receiving the upload, its job
    manager's ``replica_id``) and a lease of ``lease_s`` that the holder renews while the
    upload runs (``IdempotencyKeys.renew``, from Integration's timer). A pending row is live
    while its lease is: an upload may take hours (500 MB at the minimum upload rate), so
    ``pending_ttl_s`` does not bound it here, and a crashed replica's key is free one lease
    later. ``release_pending`` (each replica's start) deletes dead holders' rows only.
    """

    def __init__(self, store: PostgresJobStore, *, holder: str, lease_s: float = 30.0) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.store = store
        self.holder = holder
        self.lease_s = float(lease_s)

    def reserve(self, owner: Optional[str], key: str, request_id: str, now: datetime, ttl_s: float,
                pending_ttl_s: float) -> KeyRecord:
        owner_col = owner or ""
        for _ in range(3):
            with self.store.transaction() as conn:
                # a conflicting row is locked by ON CONFLICT even when WHERE keeps it: the SELECT below sees it
                row = conn.execute(
                    """INSERT INTO idempotency_keys (owner, key, request_id, created_at, holder, lease_expires_at)
                       VALUES (%s, %s, %s, clock_timestamp(), %s, clock_timestamp() + make_interval(secs => %s))
                       ON CONFLICT (owner, key) DO UPDATE SET request_id = EXCLUDED.request_id, fingerprint = NULL,
                           job_id = NULL, created_at = EXCLUDED.created_at, holder = EXCLUDED.holder,
                           lease_expires_at = EXCLUDED.lease_expires_at
                       WHERE (idempotency_keys.fingerprint IS NULL
                              AND (idempotency_keys.lease_expires_at IS NULL
                                   OR idempotency_keys.lease_expires_at < clock_timestamp()))
                          OR (idempotency_keys.fingerprint IS NOT NULL
                              AND idempotency_keys.created_at < clock_timestamp() - make_interval(secs => %s))
                       RETURNING request_id, fingerprint, job_id, created_at""",
                    (owner_col, key, request_id, self.holder, self.lease_s, float(ttl_s))).fetchone()
                if row is None:  # the key is live: whose is it?
                    row = conn.execute("SELECT request_id, fingerprint, job_id, created_at FROM idempotency_keys "
                                       "WHERE owner = %s AND key = %s", (owner_col, key)).fetchone()
            if row is not None:
                return KeyRecord(owner, key, *row)
        raise RuntimeError(f"could not reserve Idempotency-Key {key!r}: it kept changing under the reservation")

    def renew(self, held: Collection[tuple[Optional[str], str, str]]) -> None:
        if not held:
            return
        owners, keys, request_ids = (list(column) for column in zip(*((o or "", k, r) for o, k, r in held)))
        with self.store.connection() as conn:
            conn.execute(
                """UPDATE idempotency_keys SET lease_expires_at = clock_timestamp() + make_interval(secs => %s)
                   WHERE holder = %s AND fingerprint IS NULL
                     AND (owner, key, request_id) IN (SELECT * FROM unnest(%s::text[], %s::text[], %s::text[]))""",
                (self.lease_s, self.holder, owners, keys, request_ids))

    def complete(self, owner: Optional[str], key: str, request_id: str, fingerprint: str, job_id: str) -> bool:
        with self.store.connection() as conn:
            return conn.execute(
                "UPDATE idempotency_keys SET fingerprint = %s, job_id = %s, holder = NULL, lease_expires_at = NULL "
                "WHERE owner = %s AND key = %s AND request_id = %s AND fingerprint IS NULL",
                (fingerprint, job_id, owner or "", key, request_id)).rowcount == 1

    def release(self, owner: Optional[str], key: str, request_id: str) -> None:
        with self.store.connection() as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE owner = %s AND key = %s AND request_id = %s "
                         "AND fingerprint IS NULL", (owner or "", key, request_id))

    def release_pending(self) -> int:
        """Pending rows whose holder stopped renewing them (it died); live replicas' uploads keep theirs."""
        with self.store.connection() as conn:
            return conn.execute("DELETE FROM idempotency_keys WHERE fingerprint IS NULL "
                                "AND (lease_expires_at IS NULL OR lease_expires_at < clock_timestamp())").rowcount

    def forget_job(self, job_id: str) -> None:
        with self.store.connection() as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE job_id = %s", (job_id,))

    def purge(self, before: datetime) -> int:
        with self.store.connection() as conn:
            return conn.execute("DELETE FROM idempotency_keys WHERE created_at < %s AND fingerprint IS NOT NULL",
                                (before,)).rowcount

    def close(self) -> None:
        """Nothing: the pool is the job store's (closed with it)."""


class PostgresUsageLedger:
    """:class:`UsageLedger` in PostgreSQL: one row per finished job, whichever replica finished it.

    ``record`` inserts once per job id, so a job finished twice (a lease takeover) is counted
    once, and the Prometheus counters count it on the replica whose insert was new.
    """

    def __init__(self, store: PostgresJobStore) -> None:
        self.store = store

    def record(self, entry: UsageEntry) -> bool:
        at = entry.finished_at
        with self.store.connection() as conn:
            return conn.execute(
                "INSERT INTO usage_jobs (job_id, owner, status, finished_at, day, output_seconds, frames) "
                "VALUES (%s, %s, %s, %s, (%s::timestamptz AT TIME ZONE 'UTC')::date, %s, %s) "
                "ON CONFLICT (job_id) DO NOTHING",
                (entry.job_id, entry.owner or "", JobStatus(entry.status).value, at, at, float(entry.output_seconds),
                 int(entry.frames))).rowcount == 1

    def summary(self, owner: Optional[str], since: date, until: date) -> UsageSummary:
        with self.store.connection() as conn:
            rows = conn.execute(
                "SELECT day::text, count(*), count(*) FILTER (WHERE status = 'completed'), "
                "count(*) FILTER (WHERE status = 'failed'), count(*) FILTER (WHERE status = 'cancelled'), "
                "coalesce(sum(output_seconds), 0), coalesce(sum(frames), 0) FROM usage_jobs "
                "WHERE owner = %s AND day BETWEEN %s AND %s GROUP BY day ORDER BY day",
                (owner or "", since, until)).fetchall()
        return summarize_days(since, until, rows)

    def purge(self, before: datetime) -> int:
        with self.store.connection() as conn:
            return conn.execute("DELETE FROM usage_jobs WHERE finished_at < %s", (before,)).rowcount

    def close(self) -> None:
        """Nothing: the pool is the job store's (closed with it)."""
