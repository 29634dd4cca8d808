"""Idempotency keys: replay within the TTL, 409 for another request, one job for concurrent POSTs.

The key store's tests run against both stores: SQLite (one file; a second connection is a second
process) and PostgreSQL (the job database replicas share; a second store with its own pool and
holder id is a second replica). Times are the store's own (the database's clock on PostgreSQL),
so the tests use real time and short TTLs and leases.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime, timedelta, timezone

import pytest

from lipsync_runner.errors import InvalidInputError
from lipsync_runner.integration.idempotency import (
    IdempotencyConflictError,
    IdempotencyInProgressError,
    IdempotencyKeys,
    SQLiteIdempotencyStore,
    expiry_cutoff,
    file_digest,
    parse_key,
    request_fingerprint,
)
from lipsync_runner.params import JobParams, parse_fields

from .concurrency import run_together

INPUTS = {"video": "sha256:" + "a" * 64, "audio": "sha256:" + "b" * 64}
SHORT_S = 0.3  # a TTL or lease that runs out within a test


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """``open_store(lease_s=30)``: the key store as one more process (SQLite: a connection to the one
    file) or one more replica (PostgreSQL: a job store with its own pool, and its own holder id)."""
    opened: list = []
    job_stores: list = []
    if request.param == "postgres":
        from lipsync_runner.jobs.postgres import PostgresJobStore
        from lipsync_runner.integration.postgres import PostgresIdempotencyStore

        url = request.getfixturevalue("pg_database")
        replicas = itertools.count(1)

        def open_one(lease_s: float = 30.0):
            job_stores.append(PostgresJobStore(url, pool_size=2))
            if len(job_stores) == 1:
                with job_stores[0].connection() as conn:  # every test starts from no keys
                    conn.execute("TRUNCATE idempotency_keys")
            opened.append(PostgresIdempotencyStore(job_stores[-1], holder=f"replica-{next(replicas)}",
                                                   lease_s=lease_s))
            return opened[-1]
    else:
        def open_one(lease_s: float = 30.0):  # no leases in SQLite: one process owns the file
            opened.append(SQLiteIdempotencyStore(tmp_path / "keys.sqlite3"))
            return opened[-1]
    yield open_one
    for s in opened:
        s.close()
    for s in job_stores:
        s.close()


@pytest.fixture
def store(open_store):
    return open_store()


@pytest.fixture
def keys(store):
    return IdempotencyKeys(store)


def created(keys: IdempotencyKeys, owner, key, fingerprint: str, job_id: str) -> None:
    """A request that held the key all the way to its job."""
    reservation = keys.reserve(owner, key)
    assert reservation.owned
    keys.complete(reservation, fingerprint, job_id)
    assert reservation.completed


def fp(params: JobParams | None = None, inputs: dict[str, str] | None = None) -> str:
    return request_fingerprint(params or JobParams(), INPUTS if inputs is None else inputs)


def test_key_header_is_checked():
    assert parse_key(None) is None and parse_key("  ") is None
    assert parse_key(" 9b2f0c1e-5d4a-4b8e-9a51-3c2d1e0f7a6b ") == "9b2f0c1e-5d4a-4b8e-9a51-3c2d1e0f7a6b"
    assert parse_key("order 1234/fr") == "order 1234/fr"
    for bad in ("k" * 256, "tab\there", "caf\u00e9", "nul\x00"):
        with pytest.raises(InvalidInputError, match="Idempotency-Key"):
            parse_key(bad)


def test_fingerprint_covers_every_parameter_and_each_inputs_content(tmp_path):
    base = fp()
    assert fp(JobParams(), dict(reversed(INPUTS.items()))) == base  # order does not matter
    assert fp(JobParams(bbox_shift=5)) != base
    assert fp(parse_fields({"webhook_url": "https://h.example/a"})) != base
    assert fp(inputs={**INPUTS, "audio": "sha256:" + "c" * 64}) != base
    urls = {"video_url": "https://b.example/in.mp4", "audio_url": "https://b.example/fr.wav"}
    assert fp(parse_fields(urls), {}) != fp(parse_fields({**urls, "audio_url": "https://b.example/de.wav"}), {})
    (tmp_path / "a").write_bytes(b"same bytes")
    (tmp_path / "b").write_bytes(b"same bytes")
    (tmp_path / "c").write_bytes(b"other bytes")
    assert file_digest(tmp_path / "a") == file_digest(tmp_path / "b") != file_digest(tmp_path / "c")


def test_same_key_same_request_returns_the_original_job(keys):
    created(keys, "owner1", "k1", fp(), "job-1")
    again = keys.reserve("owner1", "k1")
    assert not again.owned and keys.replayed_job(again, fp()) == "job-1"


def test_same_key_different_request_is_a_409(keys):
    created(keys, "owner1", "k1", fp(), "job-1")
    again = keys.reserve("owner1", "k1")
    with pytest.raises(IdempotencyConflictError, match="different request") as e:
        keys.replayed_job(again, fp(JobParams(bbox_shift=1)))
    assert e.value.http_status == 409


def test_while_the_first_request_is_received_the_key_is_in_progress(keys):
    """The loser is answered before it uploads anything: 409 with a retry hint."""
    first = keys.reserve("o", "k")
    with pytest.raises(IdempotencyInProgressError, match="still being received") as e:
        keys.reserve("o", "k")
    assert e.value.http_status == 409 and e.value.retry_after_s > 0
    keys.complete(first, fp(), "job-1")
    assert keys.replayed_job(keys.reserve("o", "k"), fp()) == "job-1"


def test_keys_belong_to_their_owner_and_unscoped_jobs_share_one_owner(keys):
    created(keys, "owner1", "k", fp(), "job-1")
    created(keys, "owner2", "k", fp(), "job-2")
    created(keys, None, "k", fp(), "job-3")
    # no owner (auth off) is one owner, not "every NULL is different" as in a SQL unique key
    assert keys.replayed_job(keys.reserve(None, "k"), fp()) == "job-3"


def test_keys_expire_after_the_ttl(store):
    keys = IdempotencyKeys(store, ttl_s=SHORT_S)
    created(keys, "o", "k", fp(), "job-1")
    assert not keys.reserve("o", "k").owned  # within the TTL: a replay
    time.sleep(SHORT_S + 0.1)
    later = keys.reserve("o", "k")
    assert later.owned  # a new request may use the key again
    keys.complete(later, fp(JobParams(bbox_shift=2)), "job-2")
    assert store.purge(expiry_cutoff(utcnow(), SHORT_S)) == 0  # job-2's key still protects it
    time.sleep(SHORT_S + 0.1)
    assert store.purge(expiry_cutoff(utcnow(), SHORT_S)) == 1


def test_a_failed_admission_or_a_removed_job_frees_the_key(keys, store):
    first = keys.reserve("o", "k")
    keys.release(first)  # the upload behind it was refused (413)
    second = keys.reserve("o", "k")
    assert second.owned
    keys.release(first)  # a stale release cannot free someone else's reservation
    with pytest.raises(IdempotencyInProgressError):
        keys.reserve("o", "k")
    keys.complete(second, fp(), "job-2")
    keys.release(second)  # after complete: nothing happens
    assert keys.replayed_job(keys.reserve("o", "k"), fp()) == "job-2"
    store.forget_job("job-2")  # cleaned up: the key is free
    assert keys.reserve("o", "k").owned


def test_a_restart_frees_the_keys_of_uploads_that_died_with_it(open_store):
    """SQLite: the one process starts again, so no upload is alive and every pending key goes.
    PostgreSQL: the dead replica stopped renewing its lease; the next start frees its key."""
    dead = IdempotencyKeys(open_store(lease_s=SHORT_S))
    dead.reserve("o", "k")  # ... and the process is killed mid-upload
    time.sleep(SHORT_S + 0.1)
    restarted = open_store()
    assert restarted.release_pending() == 1
    assert restarted.release_pending() == 0
    assert IdempotencyKeys(restarted).reserve("o", "k").owned


def test_an_abandoned_reservation_lapses(open_store):
    """Without a restart: SQLite after pending_ttl_s, PostgreSQL once its lease is not renewed."""
    keys = IdempotencyKeys(open_store(lease_s=SHORT_S), pending_ttl_s=SHORT_S)
    keys.reserve("o", "k")
    with pytest.raises(IdempotencyInProgressError):
        keys.reserve("o", "k")
    time.sleep(SHORT_S + 0.1)
    assert keys.reserve("o", "k").owned


def test_keys_survive_a_restart(open_store):
    first = open_store()
    created(IdempotencyKeys(first), "o", "k", fp(), "job-1")
    first.close()
    second = open_store()
    second.release_pending()  # what the service does at start: complete keys stay
    assert IdempotencyKeys(second).replayed_job(IdempotencyKeys(second).reserve("o", "k"), fp()) == "job-1"


def test_concurrent_requests_with_one_key_create_one_job(open_store):
    """Eight processes (SQLite: connections to one file) or replicas (PostgreSQL: pools on one database)
    race on each of ten keys: one holds it, the rest get 409 at once."""
    stores = [open_store() for _ in range(8)]
    for round_no in range(10):
        key = f"key-{round_no}"
        results = run_together(lambda i, key=key: IdempotencyKeys(stores[i]).reserve("o", key), len(stores))
        holders = [r for r in results if not isinstance(r, IdempotencyInProgressError)]
        assert len(holders) == 1 and holders[0].owned
        assert sum(isinstance(r, IdempotencyInProgressError) for r in results) == len(stores) - 1
        keys = IdempotencyKeys(stores[0])
        keys.complete(holders[0], fp(), f"job-{round_no}")
        assert keys.replayed_job(IdempotencyKeys(stores[5]).reserve("o", key), fp()) == f"job-{round_no}"


@pytest.mark.parametrize("open_store", ["postgres"], indirect=True)  # SQLite: one process, no other replica
def test_a_replicas_start_frees_dead_holders_keys_and_keeps_live_ones(open_store):
    """Replica A died mid-upload, replica B's upload is still streaming (it renews its lease);
    replica C starts. C frees A's key only: B's upload still holds its key (409), and gets its job."""
    dead = IdempotencyKeys(open_store(lease_s=SHORT_S))
    live = IdempotencyKeys(open_store(lease_s=SHORT_S))
    dead.reserve("o", "dead-upload")
    streaming = live.reserve("o", "live-upload")
    deadline = time.monotonic() + 3 * SHORT_S
    while time.monotonic() < deadline:  # B's timer renews; A renews nothing any more
        assert live.renew() == 1
        time.sleep(SHORT_S / 3)
    c = IdempotencyKeys(open_store())
    assert c.store.release_pending() == 1
    assert c.reserve("o", "dead-upload").owned  # a retry of A's request, now on C
    with pytest.raises(IdempotencyInProgressError):
        c.reserve("o", "live-upload")
    live.complete(streaming, fp(), "job-b")
    assert streaming.completed and live.renew() == 0  # nothing of B's left to renew
    time.sleep(SHORT_S + 0.1)  # a complete key has no lease to run out
    assert c.replayed_job(c.reserve("o", "live-upload"), fp()) == "job-b"
