"""Where job records live: a small storage interface and its SQLite implementation.

The interface (:class:`JobStore`) is deliberately tiny -- create, get, update, list,
delete, count, expired -- so that a networked store (Postgres, Redis) can implement it
and several service replicas can share one job table. Everything else (queues, worker
threads, files) belongs to the :class:`~lipsync_runner.jobs.manager.JobManager`.
Records are whole :class:`JobRecord` documents; a store only indexes the few fields it
filters and sorts on (status, owner, created_at, expires_at).

One caveat for several replicas: the manager claims a queued job with a read followed
by an update under its own process-local lock. A shared store would need that claim to
be a conditional update (``UPDATE ... WHERE status = 'queued'``) or a queue of its own.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import JobNotFoundError
from .records import JobKind, JobRecord, JobStatus

FINISHED = frozenset(s for s in JobStatus if s.finished)


@runtime_checkable
class JobStore(Protocol):
    """Persistent job records, safe to use from several threads at once.

    * ``create(record)``: insert a new record; ``ValueError`` if its id exists.
    * ``get(job_id)``: the record, or ``None``.
    * ``update(job_id, **fields)``: set fields atomically (read-modify-write in one
      transaction, validated as a :class:`JobRecord`) and return the new record;
      :class:`JobNotFoundError` if there is no such record, ``ValueError`` for an
      unknown field or an invalid value.
    * ``list(owner=None, limit=100, statuses=None, kind=None)``: newest first (by created_at);
      ``owner=None`` means every owner; ``limit=None`` means no limit; ``kind`` (job, avatar):
      records of that kind only, ``None`` every kind.
    * ``delete(job_id)``: remove the record; no error if it is already gone.
    * ``count_by_status()``: ``{status value: count}`` for every status (zeros included).
    * ``expired(now)``: finished records whose ``expires_at`` is at or before ``now``.
    * ``close()``: release connections; the store is unusable afterwards.
    """

    def create(self, record: JobRecord) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def update(self, job_id: str, **fields: object) -> JobRecord: ...

    def list(
        self, owner: str | None = None, limit: int | None = 100, statuses: Iterable[JobStatus] | None = None,
        kind: JobKind | None = None,
    ) -> list[JobRecord]: ...

    def delete(self, job_id: str) -> None: ...

    def count_by_status(self) -> dict[str, int]: ...

    def expired(self, now: datetime) -> list[JobRecord]: ...

    def close(self) -> None: ...


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # records are always aware; be safe with callers' naive datetimes
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


_SCHEMA_VERSION = 2
_MIGRATIONS: dict[int, str] = {
    # user_version N -> the script that brings a database at N-1 to N
    1: """
        CREATE TABLE IF NOT EXISTS jobs (
            job_id     TEXT PRIMARY KEY,
            status     TEXT NOT NULL,
            owner      TEXT,
            created_at REAL NOT NULL,
            expires_at REAL,
            body       TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
        CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs (owner, created_at);
        CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
        CREATE INDEX IF NOT EXISTS jobs_expires ON jobs (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # avatars are records too (JobRecord.kind): the job list and the avatar list filter on it
    2: """
        ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'job';
        CREATE INDEX IF NOT EXISTS jobs_owner_kind_created ON jobs (owner, kind, created_at);
    """,
}


class SQLiteJobStore:
    """A :class:`JobStore` in one SQLite file (stdlib ``sqlite3``).

    WAL journal with ``synchronous=NORMAL`` (a power cut may lose the last few commits,
    never corrupt the file), a busy timeout for other processes, and one connection
    shared by all threads behind a lock (every operation is a few hundred microseconds).
    The schema version is kept in ``PRAGMA user_version``.
    """

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        conn = self._conn
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate()

    # -- plumbing --------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the job store is closed")
        return self._conn

    def _migrate(self) -> None:
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path.name} has job schema version {version}, newer than this program's "
                        f"{_SCHEMA_VERSION}; upgrade the program or use another data directory"
                    )
                for target in range(version + 1, _SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[target].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db().execute("PRAGMA user_version").fetchone()[0])

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db().execute("PRAGMA journal_mode").fetchone()[0])

    @staticmethod
    def _columns(record: JobRecord) -> tuple[str, str | None, float, float | None, str, str]:
        return (
            record.status.value,
            record.owner,
            _ts(record.created_at),
            _ts(record.expires_at),
            record.model_dump_json(),
            record.kind.value,
        )

    # -- the interface ---------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        with self._lock:
            try:
                self._db().execute(
                    "INSERT INTO jobs (job_id, status, owner, created_at, expires_at, body, kind) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (record.job_id, *self._columns(record)),
                )
            except sqlite3.IntegrityError as e:
                raise ValueError(f"job {record.job_id} already exists") from e

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db().execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return JobRecord.model_validate_json(row[0]) if row else None

    def update(self, job_id: str, **fields: object) -> JobRecord:
        unknown = set(fields) - set(JobRecord.model_fields)
        if unknown:
            raise ValueError(f"unknown job record field(s): {', '.join(sorted(unknown))}")
        if "job_id" in fields and fields["job_id"] != job_id:
            raise ValueError("a job's id cannot change")
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT body FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if row is None:
                    raise JobNotFoundError("no such job")
                current = JobRecord.model_validate_json(row[0])
                record = JobRecord.model_validate({**current.model_dump(), **fields})
                conn.execute(
                    "UPDATE jobs SET status = ?, owner = ?, created_at = ?, expires_at = ?, body = ?, kind = ? "
                    "WHERE job_id = ?",
                    (*self._columns(record), job_id),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return record

    def list(
        self, owner: str | None = None, limit: int | None = 100, statuses: Iterable[JobStatus] | None = None,
        kind: JobKind | None = None,
    ) -> list[JobRecord]:
        where, args = [], []
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        if kind is not None:
            where.append("kind = ?")
            args.append(JobKind(kind).value)
        if statuses is not None:
            values = sorted({JobStatus(s).value for s in statuses})
            if not values:
                return []
            where.append(f"status IN ({', '.join('?' * len(values))})")
            args.extend(values)
        sql = "SELECT body FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(max(0, int(limit)))
        with self._lock:
            rows = self._db().execute(sql, args).fetchall()
        return [JobRecord.model_validate_json(body) for (body,) in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db().execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def count_by_status(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobStatus}
        with self._lock:
            rows = self._db().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        for status, n in rows:
            counts[status] = int(n)
        return counts

    def expired(self, now: datetime) -> list[JobRecord]:
        finished = sorted(s.value for s in FINISHED)
        with self._lock:
            rows = self._db().execute(
                f"SELECT body FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ? "
                f"AND status IN ({', '.join('?' * len(finished))}) ORDER BY expires_at",
                (_ts(now), *finished),
            ).fetchall()
        return [JobRecord.model_validate_json(body) for (body,) in rows]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
