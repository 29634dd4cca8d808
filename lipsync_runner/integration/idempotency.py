"""`Idempotency-Key` on generate: a retried POST returns the job it already created.

Semantics (Stripe's, without replaying stored responses: the job itself is the answer):

* the same key from the same owner within the TTL (24 h) and the same request returns the
  original job, HTTP 200 and ``Idempotent-Replayed: true``, and starts nothing;
* the same key with a different request (other parameters, other file contents, other
  URLs) is refused with 409: the key names one request, and this is another;
* two concurrent POSTs with one key create one job. The key is *reserved* before the body
  is read (a pending row, unique per (owner, key)), so the loser is answered at once,
  without uploading for nothing: 409 "in progress" with ``Retry-After`` while the winner's
  upload runs; once the winner's job exists, the same request is a replay (200);
* keys are per owner (per token with scoped jobs): two tenants may use the same key;
* a request that fails before its job exists (a 413, a bad file, a disconnect) releases
  its reservation, so the client can retry with the same key; removing a job forgets its
  key; a reservation left by a process that died mid-upload is dropped when the service
  starts again. On a shared store (PostgreSQL) a reservation has a holder (the replica
  receiving the upload) and a lease that the holder renews while the upload runs
  (:meth:`IdempotencyKeys.renew`), so a replica's start frees only dead holders' keys,
  never the reservation of an upload streaming into another live replica.

Order in admission: ``reserve`` (409 in progress) -> the body (uploads streamed and hashed,
or the URLs) -> fingerprint -> submit the job -> ``complete`` (the row names the job). A
replay candidate (the key is complete) reads its body into scratch space only to compare
fingerprints. The window between ``submit`` and ``complete`` is two local writes; a crash
inside it leaves a pending row for a job that exists, which the next start drops (a retry
then creates a second job: documented, and far narrower than having no key at all).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from lipsync_runner.errors import InvalidInputError, LipSyncError
from lipsync_runner.params import JobParams
from lipsync_runner.jobs.sqlite_file import open_sqlite

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_CHARS = 255
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_PENDING_TTL_S = 3600.0  # a pending row older than this has died (stores without leases)
IN_PROGRESS_RETRY_S = 5


class IdempotencyConflictError(LipSyncError):
    """The key was used for a different request (409)."""

    http_status = 409


class IdempotencyInProgressError(LipSyncError):
    """Another request with this key is still being admitted (409, retry after ``retry_after_s``)."""

    http_status = 409

    def __init__(self, message: str, retry_after_s: int = IN_PROGRESS_RETRY_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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
    request_id: str  # the admission that reserved it
    fingerprint: Optional[str]  # None while pending (that admission is still reading its body)
    job_id: Optional[str]  # set with the fingerprint, once the job exists
    created_at: datetime

    @property
    def pending(self) -> bool:
        return self.fingerprint is None


@runtime_checkable
class IdempotencyStore(Protocol):
    """Idempotency keys; ``(owner, key)`` is unique (owner None counts as one owner, stored as '').

    * ``lease_s``: how long a pending record lives unless its holder renews it; None for a
      store one process owns (SQLite), where ``pending_ttl_s`` bounds a pending record and
      ``release_pending`` at start frees the rest.
    * ``reserve(owner, key, request_id, now, ttl_s, pending_ttl_s)``: atomically, the live
      record of ``(owner, key)`` if there is one, else a new pending record for
      ``request_id``. A complete record older than ``ttl_s`` is not live; a pending one is not
      live once its lease ran out (with leases) or once older than ``pending_ttl_s`` (without).
      Not live: replaced. PostgreSQL: ``INSERT ... ON CONFLICT (owner, key) DO UPDATE SET ...
      WHERE <not live> RETURNING *``, then ``SELECT`` the live row when nothing was returned.
    * ``renew(held)``: extend the leases of these pending reservations, ``(owner, key,
      request_id)`` each, that this store's holder still holds (no-op without leases).
    * ``complete(owner, key, request_id, fingerprint, job_id)``: the pending record of
      ``request_id`` now names its job; False if it is not there any more.
    * ``release(owner, key, request_id)``: remove the record if it is still ``request_id``'s
      and pending (a failed admission).
    * ``release_pending()``: remove the pending records no live process holds (at start):
      every pending record without leases (no upload survives a restart of the one process),
      those whose lease ran out with them (other replicas' uploads are alive); how many.
    * ``forget_job(job_id)``: remove the records of a removed job.
    * ``purge(before)``: remove complete records created before ``before``; how many.
    """

    lease_s: Optional[float]

    def reserve(self, owner: Optional[str], key: str, request_id: str, now: datetime, ttl_s: float,
                pending_ttl_s: float) -> KeyRecord: ...

    def renew(self, held: Collection[tuple[Optional[str], str, str]]) -> None: ...

    def complete(self, owner: Optional[str], key: str, request_id: str, fingerprint: str, job_id: str) -> bool: ...

    def release(self, owner: Optional[str], key: str, request_id: str) -> None: ...

    def release_pending(self) -> int: ...

    def forget_job(self, job_id: str) -> None: ...

    def purge(self, before: datetime) -> int: ...

    def close(self) -> None: ...


@dataclass
class Reservation:
    """What ``reserve`` decided for one request.

    ``original`` is None: this request holds the key (it creates the job, then ``complete``).
    Otherwise the key already names a job: the request is a replay if its fingerprint matches.
    """

    owner: Optional[str]
    key: str
    request_id: str
    original: Optional[KeyRecord] = None
    completed: bool = False

    @property
    def owned(self) -> bool:
        return self.original is None


class IdempotencyKeys:
    """The semantics above over a store (thread-safe as its store is).

    It remembers the reservations this process holds (reserved, neither completed nor
    released yet): :meth:`renew` extends their leases, and nothing else, so a reservation
    this process let go of (even one whose release failed) lapses one lease later.
    """

    def __init__(self, store: IdempotencyStore, *, ttl_s: float = DEFAULT_TTL_S,
                 pending_ttl_s: float = DEFAULT_PENDING_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.pending_ttl_s = pending_ttl_s
        self._held: set[tuple[Optional[str], str, str]] = set()
        self._held_lock = threading.Lock()

    def reserve(self, owner: Optional[str], key: str, now: Optional[datetime] = None) -> Reservation:
        """Hold ``key`` for a new request, or find what holds it; IdempotencyInProgressError while pending."""
        request_id = uuid.uuid4().hex
        record = self.store.reserve(owner, key, request_id, now or datetime.now(timezone.utc), self.ttl_s,
                                    self.pending_ttl_s)
        if record.request_id == request_id:
            with self._held_lock:
                self._held.add((owner, key, request_id))
            return Reservation(owner, key, request_id)
        if record.pending:
            raise IdempotencyInProgressError(
                f"A request with {IDEMPOTENCY_HEADER} {key!r} is still being received; retry in a few seconds "
                "to get its job")
        return Reservation(owner, key, request_id, original=record)

    def renew(self) -> int:
        """Extend the leases of the reservations held here (their uploads are still running); how many."""
        with self._held_lock:
            held = list(self._held)
        if held:
            self.store.renew(held)
        return len(held)

    def _let_go(self, reservation: Reservation) -> None:
        with self._held_lock:
            self._held.discard((reservation.owner, reservation.key, reservation.request_id))

    def complete(self, reservation: Reservation, fingerprint: str, job_id: str) -> None:
        if not reservation.owned:
            return
        try:
            if self.store.complete(reservation.owner, reservation.key, reservation.request_id, fingerprint, job_id):
                reservation.completed = True
        finally:  # completed, gone (its lease ran out and another request took the key) or failed
            self._let_go(reservation)

    def release(self, reservation: Reservation) -> None:
        if reservation.owned and not reservation.completed:
            try:
                self.store.release(reservation.owner, reservation.key, reservation.request_id)
            finally:
                self._let_go(reservation)

    @staticmethod
    def replayed_job(reservation: Reservation, fingerprint: str) -> str:
        """The original job's id for a request equal to it; IdempotencyConflictError (409) otherwise."""
        original = reservation.original
        assert original is not None and original.job_id is not None
        if original.fingerprint != fingerprint:
            raise IdempotencyConflictError(
                f"{IDEMPOTENCY_HEADER} {reservation.key!r} was already used for a different request (job "
                f"{original.job_id}); use a new key for a new request")
        return original.job_id


_SCHEMA = """
    CREATE TABLE IF NOT EXISTS idempotency_keys (
        owner       TEXT NOT NULL,   -- '' when jobs are not scoped: NULLs would never collide in a unique key
        key         TEXT NOT NULL,
        request_id  TEXT NOT NULL,
        fingerprint TEXT,            -- NULL while pending
        job_id      TEXT,
        created_at  REAL NOT NULL,
        PRIMARY KEY (owner, key)
    );
    CREATE INDEX IF NOT EXISTS idempotency_keys_job ON idempotency_keys (job_id);
    CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
"""
_COLUMNS = "request_id, fingerprint, job_id, created_at"


class SQLiteIdempotencyStore:
    """:class:`IdempotencyStore` in a SQLite file (its own, or shared); safe across processes.

    No leases: the file is in the data directory one process owns, so at that process's
    start no upload is alive and ``release_pending`` frees every pending key.
    """

    lease_s = None

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = open_sqlite(self.path, _SCHEMA, busy_timeout_ms=busy_timeout_ms)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the idempotency store is closed")
        return self._conn

    def reserve(self, owner: Optional[str], key: str, request_id: str, now: datetime, ttl_s: float,
                pending_ttl_s: float) -> KeyRecord:
        owner_col = owner or ""
        now_ts = now.timestamp()
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")  # the write lock first: two processes cannot both see "no row"
            try:
                row = db.execute(f"SELECT {_COLUMNS} FROM idempotency_keys WHERE owner = ? AND key = ?",
                                 (owner_col, key)).fetchone()
                live = row is not None and row[3] > now_ts - (pending_ttl_s if row[1] is None else ttl_s)
                if not live:
                    row = (request_id, None, None, now_ts)
                    db.execute("INSERT OR REPLACE INTO idempotency_keys (owner, key, request_id, fingerprint, job_id, "
                               "created_at) VALUES (?, ?, ?, NULL, NULL, ?)", (owner_col, key, request_id, now_ts))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return KeyRecord(owner, key, row[0], row[1], row[2], datetime.fromtimestamp(row[3], timezone.utc))

    def renew(self, held: Collection[tuple[Optional[str], str, str]]) -> None:
        """Nothing to renew: pending rows here have no lease (see the class)."""

    def complete(self, owner: Optional[str], key: str, request_id: str, fingerprint: str, job_id: str) -> bool:
        with self._lock:
            return self._db().execute(
                "UPDATE idempotency_keys SET fingerprint = ?, job_id = ? WHERE owner = ? AND key = ? AND "
                "request_id = ? AND fingerprint IS NULL", (fingerprint, job_id, owner or "", key, request_id)
            ).rowcount == 1

    def release(self, owner: Optional[str], key: str, request_id: str) -> None:
        with self._lock:
            self._db().execute("DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND request_id = ? "
                               "AND fingerprint IS NULL", (owner or "", key, request_id))

    def release_pending(self) -> int:
        with self._lock:
            return self._db().execute("DELETE FROM idempotency_keys WHERE fingerprint IS NULL").rowcount

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            self._db().execute("DELETE FROM idempotency_keys WHERE job_id = ?", (job_id,))

    def purge(self, before: datetime) -> int:
        with self._lock:
            return self._db().execute("DELETE FROM idempotency_keys WHERE created_at < ? AND fingerprint IS NOT NULL",
                                      (before.timestamp(),)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def expiry_cutoff(now: datetime, ttl_s: float = DEFAULT_TTL_S) -> datetime:
    """``purge(expiry_cutoff(now))`` removes the keys that no longer protect anything."""
    return now - timedelta(seconds=ttl_s)
