"""The job stores' SQL, said once: SQLite (store.py) and PostgreSQL (postgres.py) differ only in
their dialect (placeholders, table names, the tie-break column, how a list of values is matched,
how time is written), not in their queries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lipsync_runner.jobs.records import JobKind, JobStatus

#: The indexed columns of a record, in the order the stores' ``_columns`` give them.
RECORD_COLUMNS = ("status", "owner", "created_at", "expires_at", "lease_owner", "{lease}", "body")


@dataclass(frozen=True)
class Dialect:
    placeholder: str  # "?" (sqlite3) or "%s" (psycopg)
    jobs: str  # the records' table
    uploads: str  # uploads in progress
    tie: str  # insertion order, for ties of created_at
    lease_column: str  # when a running job's lease expires
    upload_expiry: str  # when an upload's reservation expires
    any_array: bool  # "col = ANY(%s)" with one array parameter, else "col IN (?, ?, ...)"
    now: str | None  # the database's clock, or None: the caller passes the time as a parameter

    def one_of(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        if self.any_array:
            return f"{column} = ANY({self.placeholder})", [values]
        return f"{column} IN ({', '.join([self.placeholder] * len(values))})", list(values)


SQLITE = Dialect(placeholder="?", jobs="jobs", uploads="uploads", tie="rowid", lease_column="lease_expires",
                 upload_expiry="expires", any_array=False, now=None)
POSTGRES = Dialect(placeholder="%s", jobs="lipsync_jobs", uploads="lipsync_uploads", tie="seq",
                   lease_column="lease_expires_at", upload_expiry="expires_at", any_array=True,
                   now="clock_timestamp()")


class JobSQL:
    """Every statement both stores run; ``p`` is the dialect's placeholder."""

    def __init__(self, dialect: Dialect) -> None:
        d = self.dialect = dialect
        p = d.placeholder
        columns = [c.format(lease=d.lease_column) for c in RECORD_COLUMNS]
        self.insert = (f"INSERT INTO {d.jobs} ({', '.join(columns)}, job_id, kind) "
                       f"VALUES ({', '.join([p] * (len(columns) + 2))})")
        self.update = f"UPDATE {d.jobs} SET {', '.join(f'{c} = {p}' for c in columns)} WHERE job_id = {p}"
        self.body = f"SELECT body FROM {d.jobs} WHERE job_id = {p}"
        self.delete = f"DELETE FROM {d.jobs} WHERE job_id = {p}"
        self.count_by_status = f"SELECT status, COUNT(*) FROM {d.jobs} GROUP BY status"
        self.next_queued = (f"SELECT body FROM {d.jobs} WHERE status = 'queued' "
                            f"ORDER BY created_at, {d.tie} LIMIT 1")
        self.release_upload = f"DELETE FROM {d.uploads} WHERE job_id = {p}"
        self.insert_upload = f"INSERT INTO {d.uploads} (job_id, holder, {d.upload_expiry}) VALUES ({p}, {p}, {{}})"
        now = d.now or p
        self.live_uploads = f"SELECT job_id FROM {d.uploads} WHERE {d.upload_expiry} >= {now}"
        self.drop_lapsed_uploads = f"DELETE FROM {d.uploads} WHERE {d.upload_expiry} < {now}"
        self.waiting = (f"SELECT (SELECT COUNT(*) FROM {d.jobs} WHERE status = 'queued') "
                        f"+ (SELECT COUNT(*) FROM {d.uploads})")
        self.lapsed = (f"SELECT body FROM {d.jobs} WHERE status = 'processing' "
                       f"AND ({d.lease_column} IS NULL OR {d.lease_column} < {now}) ORDER BY created_at, {d.tie}")

    def listing(self, owner: str | None, limit: int | None, statuses: Iterable[JobStatus] | None,
                kind: JobKind | None) -> tuple[str, list[Any]] | None:
        """A list's query, newest first; None when ``statuses`` is empty (nothing can match)."""
        d, p = self.dialect, self.dialect.placeholder
        where: list[str] = []
        args: list[Any] = []
        if owner is not None:
            where.append(f"owner = {p}")
            args.append(owner)
        if kind is not None:
            where.append(f"kind = {p}")
            args.append(JobKind(kind).value)
        if statuses is not None:
            values = sorted({JobStatus(s).value for s in statuses})
            if not values:
                return None
            clause, more = d.one_of("status", values)
            where.append(clause)
            args.extend(more)
        sql = f"SELECT body FROM {d.jobs}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at DESC, {d.tie} DESC"
        if limit is not None:
            sql += f" LIMIT {p}"
            args.append(max(0, int(limit)))
        return sql, args

    def expired(self, now: Any, finished: Iterable[JobStatus]) -> tuple[str, list[Any]]:
        """Finished records whose retention ran out by ``now``, oldest expiry first."""
        d, p = self.dialect, self.dialect.placeholder
        clause, args = d.one_of("status", sorted(s.value for s in finished))
        return (f"SELECT body FROM {d.jobs} WHERE expires_at IS NOT NULL AND expires_at <= {p} AND {clause} "
                f"ORDER BY expires_at", [now, *args])
