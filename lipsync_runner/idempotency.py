"""`Idempotency-Key` on generate: a retried POST returns the job it already created.

Semantics (Stripe's, without replaying stored responses: the job itself is the answer):

* the same key from the same owner within the TTL (24 h) and the same request returns the
  original job, HTTP 200 and ``Idempotent-Replayed: true``, and starts nothing;
* the same key with a different request (other parameters, other file contents, other URLs)
  is refused with 409: the key names one request, and this is another;
* two concurrent POSTs with one key create one job: the (owner, key) pair is a unique key in
  the store, and the one that inserts first wins; the other gets the winner's job;
* keys are per owner (per token with scoped jobs): two tenants may use the same key;
* when a request fails before its job exists (a 413, a bad file), admission releases the
  key, so the client can retry with the same key; cleaning a job up forgets its key.

Admission order: inputs known (uploads streamed and hashed, or the URLs) -> fingerprint ->
``admit`` -> create the job record. In a store with both tables, ``reserve`` and the job's
insert go in one transaction, so a key never points at a job that does not exist yet.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from .errors import InvalidInputError, LipSyncError
from .params import JobParams

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
DEFAULT_TTL_S = 24 * 3600.0


class IdempotencyConflictError(LipSyncError):
    """The key was used for a different request (409)."""

    http_status = 409


def parse_key(value: Optional[str]) -> Optional[str]:
    """The header's key, or None without one; InvalidInputError (400) for a malformed key."""
    if value is None:
        return None
    key = value.strip()
    if not key:
        return None
    if len(key) > MAX_KEY_CHARS:
        raise InvalidInputError(f"{IDEMPOTENCY_HEADER} is longer than {MAX_KEY_CHARS} characters")
    if not all(0x20 <= ord(ch) < 0x7F for ch in key):
        raise InvalidInputError(f"{IDEMPOTENCY_HEADER} must be printable ASCII (a UUID is a good key)")
    return key


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def request_fingerprint(params: JobParams, inputs: Mapping[str, str]) -> str:
    """What makes two requests "the same": every job parameter and each input's content or URL.

    ``inputs`` maps an input's name to ``file_digest(...)`` of its upload, or to its URL
    (``video_url`` is a parameter too, so a URL input is covered by ``params`` already).
    """
    canonical = json.dumps({"params": params.model_dump(mode="json"), "inputs": dict(sorted(inputs.items()))},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    owner: Optional[str]
    key: str
    fingerprint: str
    job_id: str
    created_at: datetime


@runtime_checkable
class IdempotencyStore(Protocol):
    """Idempotency keys in the job store; ``(owner, key)`` is unique (owner None counts as one owner).

    * ``reserve(owner, key, fingerprint, job_id, now, ttl_s)``: atomically, the live record
      of ``(owner, key)`` if there is one (whatever its fingerprint), else a new record for
      ``job_id`` (a record older than ``ttl_s`` is replaced). PostgreSQL: ``INSERT ... ON
      CONFLICT (owner, key) DO UPDATE ... WHERE created_at < now - ttl RETURNING *``, then
      ``SELECT`` the live row when nothing was returned.
    * ``release(owner, key, job_id)``: remove the record if it is still ``job_id``'s.
    * ``forget_job(job_id)``: remove the records of a deleted job.
    * ``purge(before)``: remove records created before ``before``; how many.
    """

    def reserve(self, owner: Optional[str], key: str, fingerprint: str, job_id: str, now: datetime,
                ttl_s: float) -> KeyRecord: ...

    def release(self, owner: Optional[str], key: str, job_id: str) -> None: ...

    def forget_job(self, job_id: str) -> None: ...

    def purge(self, before: datetime) -> int: ...

    def close(self) -> None: ...


class Decision(str, Enum):
    created = "created"  # this request's job is the one: go on and create it
    replayed = "replayed"  # answer with the original job, 200


@dataclass(frozen=True)
class Admission:
    decision: Decision
    job_id: str


def admit(store: IdempotencyStore, owner: Optional[str], key: str, fingerprint: str, job_id: str, *,
          now: Optional[datetime] = None, ttl_s: float = DEFAULT_TTL_S) -> Admission:
    """Reserve ``key`` for ``job_id`` (a fresh id), or find the job it already belongs to; 409 on a mismatch."""
    record = store.reserve(owner, key, fingerprint, job_id, now or datetime.now(timezone.utc), ttl_s)
    if record.job_id == job_id:
        return Admission(Decision.created, job_id)
    if record.fingerprint != fingerprint:
        raise IdempotencyConflictError(
            f"{IDEMPOTENCY_HEADER} {key!r} was already used for a different request (job {record.job_id}); "
            "use a new key for a new request")
    return Admission(Decision.replayed, record.job_id)


_SCHEMA = """
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        owner       TEXT NOT NULL,   -- '' when jobs are not scoped: NULLs would never collide in a unique key
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        job_id      TEXT NOT NULL,
        created_at  REAL NOT NULL,
        PRIMARY KEY (owner, key)
    );
    CREATE INDEX IF NOT EXISTS idempotency_keys_job ON idempotency_keys (job_id);
    CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
"""


class SQLiteIdempotencyStore:
    """:class:`IdempotencyStore` in a SQLite file (the job store's, or its own); safe across processes."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = sqlite3.connect(
            str(self.path), timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the idempotency store is closed")
        return self._conn

    def reserve(self, owner: Optional[str], key: str, fingerprint: str, job_id: str, now: datetime,
                ttl_s: float) -> KeyRecord:
        owner_col = owner or ""
        now_ts = now.timestamp()
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")  # the write lock first: two processes cannot both see "no row"
            try:
                row = db.execute("SELECT fingerprint, job_id, created_at FROM idempotency_keys "
                                 "WHERE owner = ? AND key = ?", (owner_col, key)).fetchone()
                if row is None or row[2] <= now_ts - ttl_s:
                    db.execute("INSERT OR REPLACE INTO idempotency_keys (owner, key, fingerprint, job_id, created_at) "
                               "VALUES (?, ?, ?, ?, ?)", (owner_col, key, fingerprint, job_id, now_ts))
                    row = (fingerprint, job_id, now_ts)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return KeyRecord(owner, key, row[0], row[1], datetime.fromtimestamp(row[2], timezone.utc))

    def release(self, owner: Optional[str], key: str, job_id: str) -> None:
        with self._lock:
            self._db().execute("DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND job_id = ?",
                               (owner or "", key, job_id))

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            self._db().execute("DELETE FROM idempotency_keys WHERE job_id = ?", (job_id,))

    def purge(self, before: datetime) -> int:
        with self._lock:
            return self._db().execute("DELETE FROM idempotency_keys WHERE created_at < ?",
                                      (before.timestamp(),)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def expiry_cutoff(now: datetime, ttl_s: float = DEFAULT_TTL_S) -> datetime:
    """``purge(expiry_cutoff(now))`` removes the keys that no longer protect anything."""
    return now - timedelta(seconds=ttl_s)
