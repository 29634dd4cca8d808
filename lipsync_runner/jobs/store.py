"""Where job records live: the storage interface, its SQLite implementation, and the chooser.

The store is also the queue. Every replica of the API shares one store (PostgreSQL, see
:mod:`.postgres`) or, on one machine, one process owns it (SQLite, the embedded default):

* ``claim`` hands a queued job to one worker, atomically, with a lease: owners take turns
  (:meth:`~lipsync_runner.jobs.sql.JobSQL.claim`), the oldest job first within an owner;
* the worker ``renew``\\ s its leases; a job whose lease ran out (its process died) shows up
  in ``lapsed`` and any replica may put it back in the queue;
* uploads in progress hold a reservation (``reserve_upload``), so that admission counts
  them on every replica, not just the one receiving them, globally and per owner;
* ``exclusive(name)`` lets one replica at a time do housekeeping (the retention sweep).

Records are whole :class:`JobRecord` documents; a store only indexes the few fields it
filters and sorts on (status, owner, created_at, expires_at, the lease).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from lipsync_runner.errors import JobNotFoundError
from lipsync_runner.jobs.sql import SQLITE, JobSQL
from lipsync_runner.jobs.sqlite_file import open_sqlite
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus, utcnow

FINISHED = frozenset(s for s in JobStatus if s.finished)
SQLITE_NAME = "jobs.sqlite3"

class Admission(NamedTuple):
    """What ``reserve_upload`` decided, and the counts it decided on (before this upload)."""

    admitted: bool
    waiting: int  # queued jobs plus uploads in progress, every owner's
    owners_waiting: int  # the same for the upload's owner


Change = Callable[[JobRecord, datetime], Mapping[str, object] | None]
"""For :meth:`JobStore.modify`: (current record, the store's clock) -> fields to set, or None."""


@runtime_checkable
class JobStore(Protocol):
    """Persistent job records and the job queue, safe to use from several threads at once.

    * ``shared``: False when one process owns the store (SQLite); True when several replicas
      use it at once (then only leases tell whether a 'processing' job is still alive).
    * ``create(record)``: insert a new record and drop the upload reservation of its id;
      ``ValueError`` if the id exists.
    * ``get(job_id)``: the record, or ``None``.
    * ``update(job_id, **fields)``: set fields atomically (validated as a :class:`JobRecord`);
      :class:`JobNotFoundError` if there is no such record, ``ValueError`` for an unknown
      field or an invalid value.
    * ``modify(job_id, change)``: read-modify-write in one transaction, the record locked:
      ``change(current, now)`` returns the fields to set (or None: leave it) and may raise
      to abort. Returns the record as it is afterwards.
    * ``list(owner=None, limit=100, statuses=None, kind=None)``: newest first (by created_at);
      ``owner=None`` means every owner; ``limit=None`` means no limit; ``kind`` (job, avatar):
      records of that kind only, ``None`` every kind.
    * ``delete(job_id)``: remove the record; no error if it is already gone.
    * ``count_by_status()``: ``{status value: count}`` for every status (zeros included).
    * ``expired(now)``: finished records whose ``expires_at`` is at or before ``now``.
    * ``claim(holder, lease_s, max_running_per_owner=0)``: a queued job, now 'processing' (stage
      'starting', attempts + 1, started now) and leased to ``holder`` for ``lease_s``; None if
      nothing can be claimed. Owners take turns: the owner with the fewest jobs running, then the
      one served least recently, its oldest job; owners running ``max_running_per_owner`` jobs
      (0: no cap) are passed over. Two callers never get the same job.
    * ``renew(holder, job_ids, lease_s)``: extend the leases ``holder`` still has on those
      jobs; returns ``{job_id: cancel_requested}`` for each one still held (a missing id
      means the lease was lost: the record is gone, finished, or taken over).
    * ``lapsed()``: 'processing' records whose lease has run out (or that have none).
    * ``reserve_upload(job_id, holder, max_waiting, lease_s, owner=None, max_owner_waiting=None)``:
      admit an upload of ``owner`` if fewer than ``max_waiting`` jobs are queued or being uploaded
      (all replicas), and fewer than ``max_owner_waiting`` (None: no limit) of that owner's; returns
      an :class:`Admission`. Reservations last ``lease_s`` unless renewed.
    * ``renew_uploads(holder, job_ids, lease_s)``, ``release_upload(job_id)``,
      ``uploads()`` (ids of live reservations).
    * ``exclusive(name)``: a context manager yielding True in at most one process at a time
      (others get False at once); for once-per-fleet housekeeping.
    * ``close()``: release connections; the store is unusable afterwards.
    """

    shared: bool

    def create(self, record: JobRecord) -> None: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def update(self, job_id: str, /, **fields: object) -> JobRecord: ...

    def modify(self, job_id: str, change: Change) -> JobRecord: ...

    def list(
        self, owner: str | None = None, limit: int | None = 100, statuses: Iterable[JobStatus] | None = None,
        kind: JobKind | None = None,
    ) -> list[JobRecord]: ...

    def delete(self, job_id: str) -> None: ...

    def count_by_status(self) -> dict[str, int]: ...

    def expired(self, now: datetime) -> list[JobRecord]: ...

    def claim(self, holder: str, lease_s: float, max_running_per_owner: int = 0) -> JobRecord | None: ...

    def renew(self, holder: str, job_ids: Collection[str], lease_s: float) -> dict[str, bool]: ...

    def lapsed(self) -> list[JobRecord]: ...

    def reserve_upload(self, job_id: str, holder: str, max_waiting: int, lease_s: float, owner: str | None = None,
                       max_owner_waiting: int | None = None) -> Admission: ...

    def renew_uploads(self, holder: str, job_ids: Collection[str], lease_s: float) -> None: ...

    def release_upload(self, job_id: str) -> None: ...

    def uploads(self) -> set[str]: ...

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[bool]: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------ shared by both implementations


def merge(current: JobRecord, fields: Mapping[str, object]) -> JobRecord:
    """``current`` with ``fields`` set, validated; ValueError for unknown fields or a changed id."""
    unknown = set(fields) - set(JobRecord.model_fields)
    if unknown:
        raise ValueError(f"unknown job record field(s): {', '.join(sorted(unknown))}")
    if "job_id" in fields and fields["job_id"] != current.job_id:
        raise ValueError("a job's id cannot change")
    return JobRecord.model_validate({**current.model_dump(), **fields})


def claimed_fields(current: JobRecord, holder: str, now: datetime, lease_s: float) -> dict[str, object]:
    """What a claim sets on a queued record."""
    return dict(status=JobStatus.processing, stage="starting", progress=0.0, started_at=now,
                attempts=current.attempts + 1, error=None, lease_owner=holder,
                lease_expires_at=now + timedelta(seconds=lease_s), cancel_requested=False,
                live=None)  # a new attempt starts its progressive output over


def owner_key(owner: str | None) -> str:
    """An owner as the fairness tables key it (:data:`~lipsync_runner.jobs.sql.WHO`): None is ''."""
    return owner or ""


def admits(waiting: int, owners_waiting: int, max_waiting: int, max_owner_waiting: int | None) -> Admission:
    """Both limits of admission: the owner's share first, the global one as the last guard."""
    return Admission(waiting < max_waiting and (max_owner_waiting is None or owners_waiting < max_owner_waiting),
                     waiting, owners_waiting)


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # records are always aware; be safe with callers' naive datetimes
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


# ------------------------------------------------------------------------------------- SQLite

SQL = JobSQL(SQLITE)

_SCHEMA_VERSION = 4
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
    # the store becomes the queue: leases, and reservations of uploads in progress
    2: """
        ALTER TABLE jobs ADD COLUMN lease_owner TEXT;
        ALTER TABLE jobs ADD COLUMN lease_expires REAL;
        CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (created_at) WHERE status = 'queued';
        CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (lease_expires) WHERE status = 'processing';
        CREATE TABLE IF NOT EXISTS uploads (
            job_id  TEXT PRIMARY KEY,
            holder  TEXT NOT NULL,
            expires REAL NOT NULL
        );
    """,
    # avatars are records too (JobRecord.kind): the job list and the avatar list filter on it
    3: """
        ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'job';
        CREATE INDEX IF NOT EXISTS jobs_owner_kind_created ON jobs (owner, kind, created_at);
    """,
    # fairness between owners: whose uploads are in progress, and when each owner was last served
    4: """
        ALTER TABLE uploads ADD COLUMN owner TEXT;
        CREATE TABLE IF NOT EXISTS owners (
            owner     TEXT PRIMARY KEY,
            served_at REAL NOT NULL
        );
    """,
}


class SQLiteJobStore:
    """A :class:`JobStore` in one SQLite file (stdlib ``sqlite3``), for one process.

    WAL journal with ``synchronous=NORMAL`` (a power cut may lose the last few commits,
    never corrupt the file), a busy timeout for other processes, and one connection
    shared by all threads behind a lock (every operation is a few hundred microseconds).
    The schema version is kept in ``PRAGMA user_version``. Every write transaction is
    ``BEGIN IMMEDIATE``, so a read-modify-write never interleaves with another.
    """

    shared = False

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # the schema comes from the migrations (PRAGMA user_version), not from one script
        self._conn: sqlite3.Connection | None = open_sqlite(self.path, "PRAGMA foreign_keys = ON;",
                                                            busy_timeout_ms=busy_timeout_ms, synchronous="NORMAL")
        self._migrate()

    # -- plumbing --------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the job store is closed")
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._db()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self._write() as conn:
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

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._db().execute("PRAGMA user_version").fetchone()[0])

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db().execute("PRAGMA journal_mode").fetchone()[0])

    @staticmethod
    def _columns(record: JobRecord) -> tuple[object, ...]:
        return (
            record.status.value,
            record.owner,
            _ts(record.created_at),
            _ts(record.expires_at),
            record.lease_owner,
            _ts(record.lease_expires_at),
            record.model_dump_json(),
        )

    def _put(self, conn: sqlite3.Connection, record: JobRecord) -> None:
        conn.execute(SQL.update, (*self._columns(record), record.job_id))

    @staticmethod
    def _read(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = conn.execute(SQL.body, (job_id,)).fetchone()
        return JobRecord.model_validate_json(row[0]) if row else None

    # -- records ---------------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        with self._write() as conn:
            try:
                # kind is set once: a record never changes kind
                conn.execute(SQL.insert, (*self._columns(record), record.job_id, record.kind.value))
            except sqlite3.IntegrityError as e:
                raise ValueError(f"job {record.job_id} already exists") from e
            conn.execute(SQL.release_upload, (record.job_id,))

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._read(self._db(), job_id)

    def update(self, job_id: str, /, **fields: object) -> JobRecord:
        return self.modify(job_id, lambda current, now: fields)

    def modify(self, job_id: str, change: Change) -> JobRecord:
        with self._write() as conn:
            current = self._read(conn, job_id)
            if current is None:
                raise JobNotFoundError("no such job")
            fields = change(current, utcnow())
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
        with self._lock:
            rows = self._db().execute(*query).fetchall()
        return [JobRecord.model_validate_json(body) for (body,) in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._db().execute(SQL.delete, (job_id,))

    def count_by_status(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobStatus}
        with self._lock:
            rows = self._db().execute(SQL.count_by_status).fetchall()
        for status, n in rows:
            counts[status] = int(n)
        return counts

    def expired(self, now: datetime) -> list[JobRecord]:
        with self._lock:
            rows = self._db().execute(*SQL.expired(_ts(now), FINISHED)).fetchall()
        return [JobRecord.model_validate_json(body) for (body,) in rows]

    # -- the queue -------------------------------------------------------------------------

    def claim(self, holder: str, lease_s: float, max_running_per_owner: int = 0) -> JobRecord | None:
        with self._write() as conn:
            row = conn.execute(SQL.claim(max_running_per_owner)).fetchone()
            if row is None:
                return None
            now = utcnow()
            current = JobRecord.model_validate_json(row[0])
            record = merge(current, claimed_fields(current, holder, now, lease_s))
            self._put(conn, record)
            conn.execute(SQL.served, (owner_key(record.owner), _ts(now)))
        return record

    def renew(self, holder: str, job_ids: Collection[str], lease_s: float) -> dict[str, bool]:
        held: dict[str, bool] = {}
        if not job_ids:
            return held
        with self._write() as conn:
            until = utcnow() + timedelta(seconds=lease_s)
            for job_id in job_ids:
                current = self._read(conn, job_id)
                if current is None or current.status is not JobStatus.processing or current.lease_owner != holder:
                    continue
                self._put(conn, current.model_copy(update={"lease_expires_at": until}))
                held[job_id] = current.cancel_requested
        return held

    def lapsed(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db().execute(SQL.lapsed, (_ts(utcnow()),)).fetchall()
        return [JobRecord.model_validate_json(body) for (body,) in rows]

    # -- uploads in progress ---------------------------------------------------------------

    def reserve_upload(self, job_id: str, holder: str, max_waiting: int, lease_s: float, owner: str | None = None,
                       max_owner_waiting: int | None = None) -> Admission:
        with self._write() as conn:
            now = _ts(utcnow())
            conn.execute(SQL.drop_lapsed_uploads, (now,))
            who = owner_key(owner)
            got = admits(int(conn.execute(SQL.waiting).fetchone()[0]),
                         int(conn.execute(SQL.owner_waiting, (who, who)).fetchone()[0]), max_waiting, max_owner_waiting)
            if got.admitted:
                conn.execute(SQL.insert_upload.format("?"), (job_id, holder, owner, now + lease_s))
        return got

    def renew_uploads(self, holder: str, job_ids: Collection[str], lease_s: float) -> None:
        if not job_ids:
            return
        with self._write() as conn:
            until = _ts(utcnow()) + lease_s
            conn.executemany("UPDATE uploads SET expires = ? WHERE job_id = ? AND holder = ?",
                             [(until, job_id, holder) for job_id in job_ids])

    def release_upload(self, job_id: str) -> None:
        with self._lock:
            self._db().execute(SQL.release_upload, (job_id,))

    def uploads(self) -> set[str]:
        with self._lock:
            rows = self._db().execute(SQL.live_uploads, (_ts(utcnow()),)).fetchall()
        return {job_id for (job_id,) in rows}

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        # One process owns a SQLite store (the manager holds the data-directory lock).
        yield True

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
