"""What only the PostgreSQL store has to show: migrations that replicas may race, claims that skip
rows other transactions hold, a database that goes away and comes back, and URLs kept out of logs.
(Everything else runs in tests/test_jobs.py against both stores.)"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import psycopg
import pytest

from lipsync_runner.jobs import JobRecord, JobStatus, new_job_id
from lipsync_runner.jobs.store_factory import open_store
from lipsync_runner.jobs.postgres import SCHEMA_VERSION, JobStoreUnavailableError, PostgresJobStore, describe
from lipsync_runner.jobs.store import SQLiteJobStore

from .concurrency import raised, run_together


def record(**fields) -> JobRecord:
    return JobRecord(job_id=new_job_id(), video_filename="v.mp4", audio_filename="a.wav", video_file="video.mp4",
                     audio_file="audio.wav", **fields)


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {name for (name,) in rows}


def test_open_store_chooses_postgres_by_url(postgres, tmp_path):
    url = postgres.create_database()
    store = open_store(url, tmp_path)
    assert isinstance(store, PostgresJobStore) and store.shared
    store.close()
    local = open_store(None, tmp_path)
    assert isinstance(local, SQLiteJobStore) and not local.shared and (tmp_path / "jobs.sqlite3").is_file()
    local.close()
    with pytest.raises(ValueError, match="postgresql://"):
        open_store("mysql://db/jobs", tmp_path)


def test_replicas_starting_together_migrate_the_schema_once(postgres):
    """Eight stores open a fresh database at the same moment: the advisory lock serialises the
    migration (its CREATE TABLEs have no IF NOT EXISTS, so a second run would fail loudly)."""
    url = postgres.create_database()
    results = run_together(lambda _: PostgresJobStore(url, pool_size=2), 8)
    errors = raised(results)
    opened = [r for r in results if isinstance(r, PostgresJobStore)]
    assert errors == [] and len(opened) == 8
    assert all(s.schema_version == SCHEMA_VERSION for s in opened)
    assert {"lipsync_jobs", "lipsync_uploads", "lipsync_schema"} <= tables(url)
    rec = record()
    opened[0].create(rec)
    assert opened[7].get(rec.job_id) == rec  # one table, seen by all
    for s in opened:
        s.close()
    PostgresJobStore(url).close()  # and again later: nothing to do, no error


def test_a_database_from_a_newer_program_is_refused(postgres):
    url = postgres.create_database()
    PostgresJobStore(url).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE lipsync_schema SET version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        PostgresJobStore(url)


def test_a_claim_skips_a_job_another_transaction_holds_instead_of_waiting(postgres):
    url = postgres.create_database()
    store = PostgresJobStore(url)
    first, second = record(), record()
    store.create(first)
    time.sleep(0.01)
    store.create(second)
    with psycopg.connect(url) as other:  # another replica, in the middle of claiming the oldest job
        other.execute("SELECT 1 FROM lipsync_jobs WHERE job_id = %s FOR UPDATE", (first.job_id,))
        start = time.monotonic()
        claimed = store.claim("me", lease_s=30)
        assert time.monotonic() - start < 2  # did not wait for the other transaction
        assert claimed.job_id == second.job_id
        other.rollback()
    assert store.claim("me", lease_s=30).job_id == first.job_id
    store.close()


def test_the_store_survives_its_connections_being_killed(postgres):
    """A database restart or failover drops every connection: the pool replaces them."""
    url = postgres.create_database()
    store = PostgresJobStore(url, pool_size=3)
    rec = record()
    store.create(rec)
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres.url, autocommit=True) as admin:
        killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)).fetchone()[0]
    assert killed >= 1
    assert store.get(rec.job_id) == rec
    assert store.update(rec.job_id, stage="after").stage == "after"
    store.close()


def test_an_unreachable_database_is_a_503_that_does_not_leak_the_password(postgres):
    from .backends import free_port

    url = f"postgresql://lipsync:s3cret-pw@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(JobStoreUnavailableError) as e:
        PostgresJobStore(url, connect_timeout_s=1)
    assert e.value.http_status == 503 and "s3cret-pw" not in str(e.value) and "127.0.0.1" in str(e.value)
    assert describe(url) == f"127.0.0.1:{url.split(':')[3].split('/')[0]}/jobs"


def test_an_unreachable_database_later_is_a_503_too(postgres):
    url = postgres.create_database()
    store = PostgresJobStore(url, pool_size=2, connect_timeout_s=1)
    store.close()  # as if the server went away: every call fails the same clear way
    with pytest.raises(JobStoreUnavailableError):
        store.get(new_job_id())
    assert JobStoreUnavailableError.http_status == 503


def test_finished_and_processing_counts_are_seen_by_every_replica(postgres):
    url = postgres.create_database()
    a, b = PostgresJobStore(url), PostgresJobStore(url)
    for status in (JobStatus.queued, JobStatus.queued, JobStatus.completed):
        a.create(record(status=status))
    b.claim("replica-b", lease_s=30)
    assert a.count_by_status() == b.count_by_status() == {
        "queued": 1, "processing": 1, "completed": 1, "failed": 0, "cancelled": 0}
    a.close()
    b.close()


def test_api_replicas_keep_the_integration_tables_in_the_job_database(postgres, tmp_path):
    """Two API replicas (ServiceCore) on one database: the outbox, keys and usage are its tables (no SQLite
    file), shared: a key reserved by an upload streaming into A is in progress on B, also after B's
    start, as long as A's timer renews its lease; once A is gone, its key is free one lease later."""
    from lipsync_runner.integration.idempotency import IdempotencyInProgressError
    from lipsync_runner.integration.postgres import PostgresIdempotencyStore
    from lipsync_runner.serving.core import ServiceCore
    from lipsync_runner.config import Settings
    from lipsync_runner.config import ServiceSettings
    from lipsync_runner.integration.usage import UsageEntry

    url = postgres.create_database()

    def replica(name: str) -> ServiceCore:
        return ServiceCore(None, Settings(service=ServiceSettings(data_dir=tmp_path / name, database_url=url, lease_s=1,
                                                                  avatar_cache=False, free_space_floor_mb=0)))

    a, b = replica("a"), replica("b")
    assert {"webhook_deliveries", "idempotency_keys", "usage_jobs"} <= tables(url)
    assert isinstance(a.integration.key_store, PostgresIdempotencyStore)
    assert a.integration.key_store.holder == a.manager.replica_id != b.manager.replica_id
    a.integration.start()
    try:
        streaming = a.integration.keys.reserve("o", "k")
        b.integration.start()  # B's start releases dead holders' keys only
        time.sleep(1.5)  # past one lease: A's timer renewed it
        with pytest.raises(IdempotencyInProgressError):
            b.integration.keys.reserve("o", "k")
        a.integration.ledger.record(UsageEntry(new_job_id(), "o", JobStatus.completed, datetime.now(timezone.utc),
                                               2.0, 50))
        assert b.integration.usage("o")["frames"] == 50
    finally:
        a.integration.stop()  # A goes away mid-upload: nobody renews its key any more
    assert streaming.owned and not streaming.completed
    time.sleep(1.2)
    assert b.integration.keys.reserve("o", "k").owned
    for core in (a, b):
        core.integration.stop()
        core.manager.close()
    assert not any((tmp_path / name / "integration.sqlite3").exists() for name in "ab")
