"""The job store a deployment asks for: PostgreSQL by URL (shared by replicas), else SQLite."""

from __future__ import annotations

from pathlib import Path

from lipsync_runner.jobs.store import SQLITE_NAME, JobStore, SQLiteJobStore


def open_store(database_url: str | None, data_dir: Path | str, *, pool_size: int = 8) -> JobStore:
    """PostgreSQL when ``database_url`` is a ``postgresql://`` URL, else SQLite in the data directory."""
    if database_url:
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("the database URL must start with postgresql:// (SQLite needs no URL: it is the "
                             "default, in the data directory)")
        from lipsync_runner.jobs.postgres import PostgresJobStore  # psycopg only when asked for

        return PostgresJobStore(database_url, pool_size=pool_size)
    return SQLiteJobStore(Path(data_dir) / SQLITE_NAME)
