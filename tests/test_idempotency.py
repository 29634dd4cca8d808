"""Idempotency keys: replay within the TTL, 409 for another request, one job for concurrent POSTs."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from lipsync_runner.errors import InvalidInputError
from lipsync_runner.idempotency import (
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

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
INPUTS = {"video": "sha256:" + "a" * 64, "audio": "sha256:" + "b" * 64}


@pytest.fixture
def store(tmp_path):
    s = SQLiteIdempotencyStore(tmp_path / "keys.sqlite3")
    yield s
    s.close()


@pytest.fixture
def keys(store):
    return IdempotencyKeys(store)


def created(keys: IdempotencyKeys, owner, key, fingerprint: str, job_id: str, now=NOW) -> None:
    """A request that held the key all the way to its job."""
    reservation = keys.reserve(owner, key, now)
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
    again = keys.reserve("owner1", "k1", NOW + timedelta(hours=23))
    assert not again.owned and keys.replayed_job(again, fp()) == "job-1"


def test_same_key_different_request_is_a_409(keys):
    created(keys, "owner1", "k1", fp(), "job-1")
    again = keys.reserve("owner1", "k1", NOW)
    with pytest.raises(IdempotencyConflictError, match="different request") as e:
        keys.replayed_job(again, fp(JobParams(bbox_shift=1)))
    assert e.value.http_status == 409


def test_while_the_first_request_is_received_the_key_is_in_progress(keys):
    """The loser is answered before it uploads anything: 409 with a retry hint."""
    first = keys.reserve("o", "k", NOW)
    with pytest.raises(IdempotencyInProgressError, match="still being received") as e:
        keys.reserve("o", "k", NOW + timedelta(seconds=30))
    assert e.value.http_status == 409 and e.value.retry_after_s > 0
    keys.complete(first, fp(), "job-1")
    assert keys.replayed_job(keys.reserve("o", "k", NOW), fp()) == "job-1"


def test_keys_belong_to_their_owner_and_unscoped_jobs_share_one_owner(keys):
    created(keys, "owner1", "k", fp(), "job-1")
    created(keys, "owner2", "k", fp(), "job-2")
    created(keys, None, "k", fp(), "job-3")
    # no owner (auth off) is one owner, not "every NULL is different" as in a SQL unique key
    assert keys.replayed_job(keys.reserve(None, "k", NOW), fp()) == "job-3"


def test_keys_expire_after_the_ttl(keys, store):
    created(keys, "o", "k", fp(), "job-1")
    later = keys.reserve("o", "k", NOW + timedelta(hours=24, seconds=1))
    assert later.owned  # a new request may use the key again
    keys.complete(later, fp(JobParams(bbox_shift=2)), "job-2")
    assert store.purge(expiry_cutoff(NOW + timedelta(hours=49))) == 1


def test_a_failed_admission_a_restart_or_a_removed_job_frees_the_key(keys, store):
    first = keys.reserve("o", "k", NOW)
    keys.release(first)  # the upload behind it was refused (413)
    second = keys.reserve("o", "k", NOW)
    assert second.owned
    keys.release(first)  # a stale release cannot free someone else's reservation
    with pytest.raises(IdempotencyInProgressError):
        keys.reserve("o", "k", NOW)
    assert store.release_pending() == 1  # the service restarted: no upload survives that
    third = keys.reserve("o", "k", NOW)
    keys.complete(third, fp(), "job-3")
    keys.release(third)  # after complete: nothing happens
    assert keys.replayed_job(keys.reserve("o", "k", NOW), fp()) == "job-3"
    store.forget_job("job-3")  # cleaned up: the key is free
    assert keys.reserve("o", "k", NOW).owned


def test_a_reservation_abandoned_on_a_shared_store_lapses(store):
    keys = IdempotencyKeys(store, pending_ttl_s=60)
    keys.reserve("o", "k", NOW)
    with pytest.raises(IdempotencyInProgressError):
        keys.reserve("o", "k", NOW + timedelta(seconds=59))
    assert keys.reserve("o", "k", NOW + timedelta(seconds=61)).owned


def test_keys_survive_a_restart(tmp_path):
    path = tmp_path / "keys.sqlite3"
    first = SQLiteIdempotencyStore(path)
    created(IdempotencyKeys(first), "o", "k", fp(), "job-1")
    first.close()
    second = SQLiteIdempotencyStore(path)
    second.release_pending()  # what the service does at start: complete keys stay
    assert IdempotencyKeys(second).replayed_job(IdempotencyKeys(second).reserve("o", "k", NOW), fp()) == "job-1"
    second.close()


def test_concurrent_requests_with_one_key_create_one_job(tmp_path):
    """Eight "replicas" (own connections to one file) race on each of ten keys: one holds it, the rest wait."""
    path = tmp_path / "keys.sqlite3"
    stores = [SQLiteIdempotencyStore(path) for _ in range(8)]
    for round_no in range(10):
        key = f"key-{round_no}"
        barrier = threading.Barrier(len(stores))
        results: list = [None] * len(stores)

        def post(i: int, key=key, barrier=barrier, results=results) -> None:
            barrier.wait()
            try:
                results[i] = IdempotencyKeys(stores[i]).reserve("o", key, NOW)
            except IdempotencyInProgressError as e:
                results[i] = e

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        holders = [r for r in results if not isinstance(r, IdempotencyInProgressError)]
        assert len(holders) == 1 and holders[0].owned
        keys = IdempotencyKeys(stores[0])
        keys.complete(holders[0], fp(), f"job-{round_no}")
        assert keys.replayed_job(IdempotencyKeys(stores[5]).reserve("o", key, NOW), fp()) == f"job-{round_no}"
    for s in stores:
        s.close()
