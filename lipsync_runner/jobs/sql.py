"""The job stores' SQL, said once: SQLite (store.py) and PostgreSQL (postgres.py) differ only in
their dialect (placeholders, table names, the tie-break column, how a list of values is matched,
how time is written, how a claim locks its row), not in their queries.

Fairness between owners is said here too, once: a claim takes the oldest queued job of the owner
with the fewest jobs running, then of the owner served least recently (the ``owners`` table keeps
each owner's last claim), so one owner's backlog never starves another's; admission counts each
owner's waiting jobs beside the global count. Owner None (jobs not scoped) is one owner, ``''``."""

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
    owners: str  # when each owner's job was last claimed (the claim's turn-taking)
    tie: str  # insertion order, for ties of created_at
    lease_column: str  # when a running job's lease expires
    upload_expiry: str  # when an upload's reservation expires
    any_array: bool  # "col = ANY(%s)" with one array parameter, else "col IN (?, ?, ...)"
    now: str | None  # the database's clock, or None: the caller passes the time as a parameter
    claim_lock: str  # appended to the claim: lock the row taken, skip those other claims hold

    def one_of(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        if self.any_array:
            return f"{column} = ANY({self.placeholder})", [values]
        return f"{column} IN ({', '.join([self.placeholder] * len(values))})", list(values)


SQLITE = Dialect(placeholder="?", jobs="jobs", uploads="uploads", owners="owners", tie="rowid",
                 lease_column="lease_expires", upload_expiry="expires", any_array=False, now=None,
                 claim_lock="")  # one writer at a time (BEGIN IMMEDIATE): nothing to lock
POSTGRES = Dialect(placeholder="%s", jobs="lipsync_jobs", uploads="lipsync_uploads", owners="lipsync_owners",
                   tie="seq", lease_column="lease_expires_at", upload_expiry="expires_at", any_array=True,
                   now="clock_timestamp()", claim_lock=" FOR UPDATE OF j SKIP LOCKED")

#: An owner as the fairness queries group them: None (jobs not scoped) is one owner, ''.
WHO = "COALESCE(owner, '')"


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
        now = d.now or p
        # after a claim: this owner's turn was now (the owner's key, then the time where the dialect has no clock)
        self.served = (f"INSERT INTO {d.owners} (owner, served_at) VALUES ({p}, {now}) "
                       f"ON CONFLICT (owner) DO UPDATE SET served_at = excluded.served_at")
        self.release_upload = f"DELETE FROM {d.uploads} WHERE job_id = {p}"
        self.insert_upload = (f"INSERT INTO {d.uploads} (job_id, holder, owner, {d.upload_expiry}) "
                              f"VALUES ({p}, {p}, {p}, {{}})")
        self.live_uploads = f"SELECT job_id FROM {d.uploads} WHERE {d.upload_expiry} >= {now}"
        self.drop_lapsed_uploads = f"DELETE FROM {d.uploads} WHERE {d.upload_expiry} < {now}"
        self.waiting = (f"SELECT (SELECT COUNT(*) FROM {d.jobs} WHERE status = 'queued') "
                        f"+ (SELECT COUNT(*) FROM {d.uploads})")
        # the same for one owner (its key, twice)
        self.owner_waiting = (f"SELECT (SELECT COUNT(*) FROM {d.jobs} WHERE status = 'queued' AND {WHO} = {p}) "
                              f"+ (SELECT COUNT(*) FROM {d.uploads} WHERE {WHO} = {p})")
        self.lapsed = (f"SELECT body FROM {d.jobs} WHERE status = 'processing' "
                       f"AND ({d.lease_column} IS NULL OR {d.lease_column} < {now}) ORDER BY created_at, {d.tie}")

    def claim(self, max_running_per_owner: int = 0) -> str:
        """The next job to claim, with the database's clock (NULL where the caller keeps the time):
        the oldest queued job of the owner with the fewest jobs running (over every replica), then of
        the owner whose last turn is longest ago (never served first), so that a worker freed from
        one owner's job serves another owner who waits; owners already running
        ``max_running_per_owner`` jobs (0: no cap) are passed over."""
        d = self.dialect
        cap = f" AND COALESCE(r.n, 0) < {int(max_running_per_owner)}" if max_running_per_owner > 0 else ""
        return (f"WITH r AS (SELECT {WHO} AS who, COUNT(*) AS n FROM {d.jobs} WHERE status = 'processing' GROUP BY 1) "
                f"SELECT j.body, {d.now or 'NULL'} FROM {d.jobs} j "
                f"LEFT JOIN r ON r.who = COALESCE(j.owner, '') "
                f"LEFT JOIN {d.owners} o ON o.owner = COALESCE(j.owner, '') "
                f"WHERE j.status = 'queued'{cap} "
                f"ORDER BY COALESCE(r.n, 0), o.served_at IS NOT NULL, o.served_at, j.created_at, j.{d.tie} "
                f"LIMIT 1{d.claim_lock}")

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
