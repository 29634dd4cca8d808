"""Usage per owner: jobs, output seconds and frames, for billing and for ``GET /api/lip-sync/usage``.

Job records expire with the retention setting, so usage is kept in its own small ledger:
one row per finished job, written once (the job id is the key, so recording a job twice
after a restart counts it once), kept for ``LIP_SYNC_USAGE_RETENTION_DAYS``. The Prometheus
counters (``lipsync_usage_*``, by owner) are incremented only when a row is new, so they
agree with the ledger; they reset with the process, the ledger does not.

A summary is always for one owner: the route passes the caller's owner id (from its token),
never one taken from the request.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from lipsync_runner.jobs.records import JobRecord, JobStatus
from lipsync_runner.jobs.logs import owner_label
from lipsync_runner.jobs.sqlite_file import open_sqlite


@dataclass(frozen=True)
class UsageEntry:
    job_id: str
    owner: Optional[str]
    status: JobStatus  # a finished one
    finished_at: datetime
    output_seconds: float = 0.0  # of video written (0 unless completed)
    frames: int = 0


def usage_entry(record: JobRecord, output_seconds: float) -> UsageEntry:
    """The ledger row of a finished job (``output_seconds``: the result's duration, from the pipeline)."""
    if not record.status.finished:
        raise ValueError(f"job {record.job_id} has not finished")
    completed = record.status is JobStatus.completed
    return UsageEntry(record.job_id, record.owner, record.status,
                      record.completed_at or datetime.now(timezone.utc),
                      float(output_seconds) if completed else 0.0, int(record.frames or 0) if completed else 0)


class UsageDay(BaseModel):
    date: str = Field(description="UTC day, YYYY-MM-DD")
    jobs: int
    completed: int
    failed: int
    cancelled: int
    output_seconds: float
    frames: int


class UsageSummary(BaseModel):
    """The body of ``GET /api/lip-sync/usage``: the caller's usage between two UTC days."""

    since: str
    until: str
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    output_seconds: float = 0.0
    frames: int = 0
    days: list[UsageDay] = Field(default_factory=list, description="Days with any finished job, oldest first.")


@runtime_checkable
class UsageLedger(Protocol):
    """Usage rows in the job store. ``record`` is idempotent per job id (True when the row is new)."""

    def record(self, entry: UsageEntry) -> bool: ...

    def summary(self, owner: Optional[str], since: date, until: date) -> UsageSummary: ...

    def purge(self, before: datetime) -> int: ...

    def close(self) -> None: ...


_SCHEMA = """
    CREATE TABLE IF NOT EXISTS usage_jobs (
        job_id         TEXT PRIMARY KEY,
        owner          TEXT NOT NULL,   -- '' when jobs are not scoped to tokens
        status         TEXT NOT NULL,
        finished_at    REAL NOT NULL,
        day            TEXT NOT NULL,   -- UTC YYYY-MM-DD of finished_at
        output_seconds REAL NOT NULL,
        frames         INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS usage_jobs_owner_day ON usage_jobs (owner, day);
"""


class SQLiteUsageLedger:
    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = open_sqlite(self.path, _SCHEMA, busy_timeout_ms=busy_timeout_ms)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the usage ledger is closed")
        return self._conn

    def record(self, entry: UsageEntry) -> bool:
        at = entry.finished_at.astimezone(timezone.utc)
        with self._lock:
            cur = self._db().execute(
                "INSERT OR IGNORE INTO usage_jobs (job_id, owner, status, finished_at, day, output_seconds, frames) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.job_id, entry.owner or "", JobStatus(entry.status).value, at.timestamp(),
                 at.date().isoformat(), float(entry.output_seconds), int(entry.frames)))
        return cur.rowcount == 1

    def summary(self, owner: Optional[str], since: date, until: date) -> UsageSummary:
        with self._lock:
            rows = self._db().execute(
                "SELECT day, COUNT(*), SUM(status = 'completed'), SUM(status = 'failed'), SUM(status = 'cancelled'), "
                "SUM(output_seconds), SUM(frames) FROM usage_jobs WHERE owner = ? AND day >= ? AND day <= ? "
                "GROUP BY day ORDER BY day", (owner or "", since.isoformat(), until.isoformat())).fetchall()
        return summarize_days(since, until, rows)

    def purge(self, before: datetime) -> int:
        with self._lock:
            return self._db().execute("DELETE FROM usage_jobs WHERE finished_at < ?", (before.timestamp(),)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def summarize_days(since: date, until: date, rows: Iterable[tuple]) -> UsageSummary:
    """A summary from a ledger's rows per day: ``(YYYY-MM-DD, jobs, completed, failed, cancelled, output
    seconds, frames)``, oldest first."""
    days = [UsageDay(date=d, jobs=n, completed=c, failed=f, cancelled=x, output_seconds=round(float(s), 3),
                     frames=int(fr)) for d, n, c, f, x, s, fr in rows]
    return UsageSummary(
        since=since.isoformat(), until=until.isoformat(), days=days,
        jobs=sum(d.jobs for d in days), completed=sum(d.completed for d in days),
        failed=sum(d.failed for d in days), cancelled=sum(d.cancelled for d in days),
        output_seconds=round(sum(d.output_seconds for d in days), 3), frames=sum(d.frames for d in days))


def account_job(ledger: UsageLedger, record: JobRecord, output_seconds: float) -> bool:
    """Record a finished job's usage once, in the ledger and the Prometheus counters; True if it was new."""
    from lipsync_runner.integration import metrics

    entry = usage_entry(record, output_seconds)
    if not ledger.record(entry):
        return False
    metrics.usage_recorded(owner_label(entry.owner), entry.status.value, entry.output_seconds, entry.frames)
    return True


def default_window(today: Optional[date] = None, days: int = 30) -> tuple[date, date]:
    """The usage route's default range: the last ``days`` UTC days, today included."""
    today = today or datetime.now(timezone.utc).date()
    return today - timedelta(days=days - 1), today
