"""The job store in PostgreSQL, shared by every replica of the API (psycopg 3 with its pool).

Chosen by ``LIP_SYNC_DATABASE_URL=postgresql://user:password@host:5432/db``. The schema is
created and migrated when the store opens: versioned (table ``lipsync_schema``), each
migration in one transaction, and serialised by an advisory lock, so replicas that start
together neither race nor apply a step twice.

The queue: a claim is ``SELECT ... FOR UPDATE SKIP LOCKED`` on the next queued row (owners
take turns: :meth:`~lipsync_runner.jobs.sql.JobSQL.claim`), so a claim never waits on a row
another transaction holds. Claims are serialised by a transaction-scoped advisory lock: each
sees the running jobs and turns of the claims before it, so the turns and the per-owner cap
hold across replicas (a claim is one short statement). Leases use the
database's clock (``clock_timestamp()``), never a replica's, so clock skew between pods does
not matter. Admission counts queued jobs plus live upload reservations in one snapshot (all of
them, and the owner's), under a transaction-scoped advisory lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Collection, Iterable, Iterator
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from lipsync_runner.errors import JobNotFoundError, LipSyncError
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus
from lipsync_runner.jobs.sql import POSTGRES, JobSQL
from lipsync_runner.jobs.store import FINISHED, Admission, Change, admits, claimed_fields, merge, owner_key

log = logging.getLogger(__name__)


SQL = JobSQL(POSTGRES)


class JobStoreUnavailableError(LipSyncError):
    """The job database cannot be reached (503: retry later; nothing stored is lost)."""

    http_status = 503


def _lock_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name (the same in every replica)."""
    return int.from_bytes(hashlib.blake2b(f"lipsync:{name}".encode(), digest_size=8).digest(), "big", signed=True)


MIGRATION_LOCK = _lock_key("migrations")
ADMISSION_LOCK = _lock_key("admission")
CLAIM_LOCK = _lock_key("claim")

SCHEMA_VERSION = 4
MIGRATIONS: dict[int, list[str]] = {
    # version N: the statements that bring a database at N-1 to N (one transaction)
    1: [
        """CREATE TABLE lipsync_jobs (
            job_id           text PRIMARY KEY,
            seq              bigserial NOT NULL,     -- insertion order, for ties of created_at
            status           text NOT NULL,
            owner            text,
            created_at       timestamptz NOT NULL,
            expires_at       timestamptz,
            lease_owner      text,
            lease_expires_at timestamptz,
            body             jsonb NOT NULL          -- the whole JobRecord
        )""",
        "CREATE INDEX lipsync_jobs_queue ON lipsync_jobs (created_at, seq) WHERE status = 'queued'",
        "CREATE INDEX lipsync_jobs_owner_created ON lipsync_jobs (owner, created_at DESC, seq DESC)",
        "CREATE INDEX lipsync_jobs_created ON lipsync_jobs (created_at DESC, seq DESC)",
        "CREATE INDEX lipsync_jobs_expires ON lipsync_jobs (expires_at) WHERE expires_at IS NOT NULL",
        "CREATE INDEX lipsync_jobs_leases ON lipsync_jobs (lease_expires_at) WHERE status = 'processing'",
        """CREATE TABLE lipsync_uploads (
            job_id     text PRIMARY KEY,
            holder     text NOT NULL,
            expires_at timestamptz NOT NULL
        )""",
    ],
    # avatars are records too (JobRecord.kind): the job list and the avatar list filter on it
    2: [
        "ALTER TABLE lipsync_jobs ADD COLUMN kind text NOT NULL DEFAULT 'job'",
        "CREATE INDEX lipsync_jobs_owner_kind_created ON lipsync_jobs (owner, kind, created_at DESC, seq DESC)",
    ],
    # the integration tables (jobs/postgres_integration.py): webhook outbox, Idempotency-Key, usage
    3: [
        """CREATE TABLE webhook_deliveries (
            delivery_id     uuid PRIMARY KEY,
            job_id          text NOT NULL,
            owner           text,
            event           text NOT NULL,
            url             text NOT NULL,
            body            text NOT NULL,
            created_at      timestamptz NOT NULL,
            next_attempt_at timestamptz,            -- NULL once delivered or given up
            attempts        int NOT NULL DEFAULT 0,
            last_attempt_at timestamptz,
            last_status     int,
            last_error      text,
            delivered_at    timestamptz,
            failed_at       timestamptz
        )""",
        "CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at, created_at) "
        "WHERE next_attempt_at IS NOT NULL",
        "CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at)",
        """CREATE TABLE idempotency_keys (
            owner            text NOT NULL,         -- '' when jobs are not scoped: NULLs never collide
            key              text NOT NULL,
            request_id       text NOT NULL,
            fingerprint      text,                  -- NULL while pending
            job_id           text,
            created_at       timestamptz NOT NULL,
            holder           text,                  -- pending rows: the replica receiving the upload
            lease_expires_at timestamptz,           -- pending rows: renewed while the upload runs
            PRIMARY KEY (owner, key)
        )""",
        "CREATE INDEX idempotency_keys_job ON idempotency_keys (job_id)",
        "CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at) WHERE fingerprint IS NOT NULL",
        """CREATE TABLE usage_jobs (
            job_id         text PRIMARY KEY,
            owner          text NOT NULL,           -- '' when jobs are not scoped
            status         text NOT NULL,
            finished_at    timestamptz NOT NULL,
            day            date NOT NULL,           -- the UTC day of finished_at
            output_seconds double precision NOT NULL,
            frames         int NOT NULL
        )""",
        "CREATE INDEX usage_jobs_owner_day ON usage_jobs (owner, day)",
    ],
    # fairness between owners: whose uploads are in progress, and when each owner was last served
    4: [
        "ALTER TABLE lipsync_uploads ADD COLUMN owner text",
        """CREATE TABLE lipsync_owners (
            owner     text PRIMARY KEY,             -- '' when jobs are not scoped
            served_at timestamptz NOT NULL          -- the owner's last claim
        )""",
    ],
}


def describe(url: str) -> str:
    """host:port/dbname of a connection URL, without its credentials (for messages and logs)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable database URL)"
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


class PostgresJobStore:
    """A :class:`~lipsync_runner.jobs.store.JobStore` in PostgreSQL, for many replicas at once."""

    shared = True

    def __init__(self, url: str, *, pool_size: int = 8, connect_timeout_s: float = 30.0) -> None:
        self.where = describe(url)
        # check: a connection the server dropped (failover, restart) is replaced, not handed out
        self._pool = ConnectionPool(url, min_size=1, max_size=max(2, pool_size), open=False,
                                    kwargs={"autocommit": True}, check=ConnectionPool.check_connection,
                                    name="lipsync-jobs", timeout=connect_timeout_s)
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except PoolTimeout as e:
            self._pool.close()
            raise JobStoreUnavailableError(f"cannot connect to the job database at {self.where}") from e
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    # -- plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection (autocommit); an unreachable database is JobStoreUnavailableError (503).
        Public for the integration tables (jobs/postgres_integration.py), which share this pool."""
        try:
            with self._pool.connection() as conn:
                yield conn
        except (psycopg.OperationalError, PoolTimeout) as e:
            log.warning("job database %s: %s", self.where, e)
            raise JobStoreUnavailableError("the job database is unavailable; try again shortly") from e

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection inside one transaction (committed on exit, rolled back on an error)."""
        with self.connection() as conn, conn.transaction():
            yield conn

    def _migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS lipsync_schema "
                         "(id int PRIMARY KEY CHECK (id = 1), version int NOT NULL)")
            row = conn.execute("SELECT version FROM lipsync_schema WHERE id = 1").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the job database at {self.where} has schema version {version}, newer than "
                                   f"this program's {SCHEMA_VERSION}; upgrade the program")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
                log.info("job database %s: migrated to schema version %d", self.where, target)
            if version < SCHEMA_VERSION:
                conn.execute("INSERT INTO lipsync_schema (id, version) VALUES (1, %s) "
                             "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version", (SCHEMA_VERSION,))

    @property
    def schema_version(self) -> int:
        with self.connection() as conn:
            return int(conn.execute("SELECT version FROM lipsync_schema WHERE id = 1").fetchone()[0])

    @staticmethod
    def _columns(record: JobRecord) -> tuple[object, ...]:
        return (record.status.value, record.owner, record.created_at, record.expires_at, record.lease_owner,
                record.lease_expires_at, Jsonb(record.model_dump(mode="json")))

    def _put(self, conn: psycopg.Connection, record: JobRecord) -> None:
        conn.execute(SQL.update, (*self._columns(record), record.job_id))

    @staticmethod
    def _records(rows: Iterable[tuple]) -> list[JobRecord]:
        return [JobRecord.model_validate(row[0]) for row in rows]

    # -- records ---------------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        with self.transaction() as conn:
            try:
                # kind is set once: a record never changes kind
                conn.execute(SQL.insert, (*self._columns(record), record.job_id, record.kind.value))
            except psycopg.errors.UniqueViolation as e:
                raise ValueError(f"job {record.job_id} already exists") from e
            conn.execute(SQL.release_upload, (record.job_id,))

    def get(self, job_id: str) -> JobRecord | None:
        with self.connection() as conn:
            row = conn.execute(SQL.body, (job_id,)).fetchone()
        return JobRecord.model_validate(row[0]) if row else None

    def update(self, job_id: str, /, **fields: object) -> JobRecord:
        return self.modify(job_id, lambda current, now: fields)

    def modify(self, job_id: str, change: Change) -> JobRecord:
        with self.transaction() as conn:
            row = conn.execute("SELECT body, clock_timestamp() FROM lipsync_jobs WHERE job_id = %s FOR UPDATE",
                               (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError("no such job")
            current = JobRecord.model_validate(row[0])
            fields = change(current, row[1])
            if not fields:
                return current
            record = merge(current, fields)
            self._put(conn, record)
        return record

    def list(
        self, owner: str | None = None, limit: int | None = 100, statuses: Iterable[JobStatus] | None = None,
        kind: JobKind | None = None,
    ) -> list[JobRecord]:
        query = SQL.listing(owner, limit, statuses, kind)
        if query is None:
            return []
        with self.connection() as conn:
            return self._records(conn.execute(*query).fetchall())

    def delete(self, job_id: str) -> None:
        with self.connection() as conn:
            conn.execute(SQL.delete, (job_id,))

    def count_by_status(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobStatus}
        with self.connection() as conn:
            for status, n in conn.execute(SQL.count_by_status).fetchall():
                counts[status] = int(n)
        return counts

    def expired(self, now: datetime) -> list[JobRecord]:
        with self.connection() as conn:
            return self._records(conn.execute(*SQL.expired(now, FINISHED)).fetchall())

    # -- the queue -------------------------------------------------------------------------

    def claim(self, holder: str, lease_s: float, max_running_per_owner: int = 0) -> JobRecord | None:
        with self.transaction() as conn:
            # one claim at a time: the next one's statement sees this one's running job and turn
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (CLAIM_LOCK,))
            # the time with the row: a claim's lease starts on the database's clock, as every check of it does
            row = conn.execute(SQL.claim(max_running_per_owner)).fetchone()
            if row is None:
                return None
            current = JobRecord.model_validate(row[0])
            record = merge(current, claimed_fields(current, holder, row[1], lease_s))
            self._put(conn, record)
            conn.execute(SQL.served, (owner_key(record.owner),))
        return record

    def renew(self, holder: str, job_ids: Collection[str], lease_s: float) -> dict[str, bool]:
        if not job_ids:
            return {}
        with self.connection() as conn:
            rows = conn.execute(
                """WITH t AS (SELECT clock_timestamp() + make_interval(secs => %s) AS until)
                   UPDATE lipsync_jobs j SET lease_expires_at = t.until,
                          body = jsonb_set(j.body, '{lease_expires_at}', to_jsonb(t.until))
                   FROM t WHERE j.job_id = ANY(%s) AND j.lease_owner = %s AND j.status = 'processing'
                   RETURNING j.job_id, COALESCE((j.body->>'cancel_requested')::boolean, false)""",
                (float(lease_s), list(job_ids), holder),
            ).fetchall()
        return {job_id: bool(cancel) for job_id, cancel in rows}

    def lapsed(self) -> list[JobRecord]:
        with self.connection() as conn:
            return self._records(conn.execute(SQL.lapsed).fetchall())

    # -- uploads in progress ---------------------------------------------------------------

    def reserve_upload(self, job_id: str, holder: str, max_waiting: int, lease_s: float, owner: str | None = None,
                       max_owner_waiting: int | None = None) -> Admission:
        with self.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADMISSION_LOCK,))
            conn.execute(SQL.drop_lapsed_uploads)
            who = owner_key(owner)
            got = admits(int(conn.execute(SQL.waiting).fetchone()[0]),
                         int(conn.execute(SQL.owner_waiting, (who, who)).fetchone()[0]), max_waiting, max_owner_waiting)
            if got.admitted:
                conn.execute(SQL.insert_upload.format("clock_timestamp() + make_interval(secs => %s)"),
                             (job_id, holder, owner, float(lease_s)))
        return got

    def renew_uploads(self, holder: str, job_ids: Collection[str], lease_s: float) -> None:
        if not job_ids:
            return
        with self.connection() as conn:
            conn.execute("UPDATE lipsync_uploads SET expires_at = clock_timestamp() + make_interval(secs => %s) "
                         "WHERE job_id = ANY(%s) AND holder = %s", (float(lease_s), list(job_ids), holder))

    def release_upload(self, job_id: str) -> None:
        with self.connection() as conn:
            conn.execute(SQL.release_upload, (job_id,))

    def uploads(self) -> set[str]:
        with self.connection() as conn:
            rows = conn.execute(SQL.live_uploads).fetchall()
        return {job_id for (job_id,) in rows}

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """A session-level advisory lock on one pooled connection (gone with it if the pod dies)."""
        key = _lock_key(name)
        with self.connection() as conn:
            got = bool(conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
            try:
                yield got
            finally:
                if got:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    def close(self) -> None:
        self._pool.close()
