"""One SQLite file shared by the service's small side tables (webhook outbox, idempotency keys, usage)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_sqlite(path: Path, schema: str, *, busy_timeout_ms: int = 5000, synchronous: str | None = None
                ) -> sqlite3.Connection:
    """A connection for use from several threads (the caller serialises it with its own lock) and
    processes (WAL, a busy timeout), in autocommit mode, with `schema` applied (CREATE ... IF NOT EXISTS)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.executescript(schema)
    return conn
