"""Idempotency keys: replay within the TTL, 409 for another request, one job for concurrent POSTs."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from lipsync_runner.errors import InvalidInputError
from lipsync_runner.idempotency import (
    Decision,
    IdempotencyConflictError,
    SQLiteIdempotencyStore,
    admit,
    expiry_cutoff,
    file_digest,
    parse_key,
    request_fingerprint,
)
from lipsync_runner.jobs.records import new_job_id
from lipsync_runner.params import JobParams, parse_fields

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
INPUTS = {"video": "sha256:" + "a" * 64, "audio": "sha256:" + "b" * 64}


@pytest.fixture
def store(tmp_path):
    s = SQLiteIdempotencyStore(tmp_path / "jobs.sqlite3")
    yield s
    s.close()


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


def test_same_key_same_request_returns_the_original_job(store):
    first = admit(store, "owner1", "k1", fp(), "job-1", now=NOW)
    again = admit(store, "owner1", "k1", fp(), "job-2", now=NOW + timedelta(hours=23))
    assert (first.decision, first.job_id) == (Decision.created, "job-1")
    assert (again.decision, again.job_id) == (Decision.replayed, "job-1")


def test_same_key_different_request_is_a_409(store):
    admit(store, "owner1", "k1", fp(), "job-1", now=NOW)
    with pytest.raises(IdempotencyConflictError, match="different request") as e:
        admit(store, "owner1", "k1", fp(JobParams(bbox_shift=1)), "job-2", now=NOW)
    assert e.value.http_status == 409


def test_keys_belong_to_their_owner_and_unscoped_jobs_share_one_owner(store):
    assert admit(store, "owner1", "k", fp(), "job-1", now=NOW).decision is Decision.created
    assert admit(store, "owner2", "k", fp(), "job-2", now=NOW).decision is Decision.created
    assert admit(store, None, "k", fp(), "job-3", now=NOW).decision is Decision.created
    # no owner (auth off) is one owner, not "every NULL is different" as in a SQL unique key
    assert admit(store, None, "k", fp(), "job-4", now=NOW).job_id == "job-3"


def test_keys_expire_after_the_ttl(store):
    admit(store, "o", "k", fp(), "job-1", now=NOW)
    later = admit(store, "o", "k", fp(JobParams(bbox_shift=2)), "job-2", now=NOW + timedelta(hours=24, seconds=1))
    assert (later.decision, later.job_id) == (Decision.created, "job-2")
    assert store.purge(expiry_cutoff(NOW + timedelta(hours=49))) == 1


def test_a_failed_admission_or_a_deleted_job_frees_the_key(store):
    admit(store, "o", "k", fp(), "job-1", now=NOW)
    store.release("o", "k", "job-other")  # not its key: nothing happens
    assert admit(store, "o", "k", fp(), "job-2", now=NOW).job_id == "job-1"
    store.release("o", "k", "job-1")  # the upload behind job-1 was refused (413)
    assert admit(store, "o", "k", fp(), "job-3", now=NOW).decision is Decision.created
    store.forget_job("job-3")
    assert admit(store, "o", "k", fp(), "job-4", now=NOW).job_id == "job-4"


def test_keys_survive_a_restart(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    first = SQLiteIdempotencyStore(path)
    admit(first, "o", "k", fp(), "job-1", now=NOW)
    first.close()
    second = SQLiteIdempotencyStore(path)
    assert admit(second, "o", "k", fp(), "job-2", now=NOW).job_id == "job-1"
    second.close()


def test_concurrent_requests_with_one_key_create_one_job(tmp_path):
    """Eight "replicas" (own connections to one file) race on each of ten keys: one job per key."""
    path = tmp_path / "jobs.sqlite3"
    stores = [SQLiteIdempotencyStore(path) for _ in range(8)]
    for round_no in range(10):
        key = f"key-{round_no}"
        barrier = threading.Barrier(len(stores))
        results: list = [None] * len(stores)

        def post(i: int, key=key, barrier=barrier, results=results) -> None:
            barrier.wait()
            results[i] = admit(stores[i], "o", key, fp(), new_job_id(), now=NOW)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        created = [r for r in results if r.decision is Decision.created]
        assert len(created) == 1
        assert {r.job_id for r in results} == {created[0].job_id}
    for s in stores:
        s.close()
