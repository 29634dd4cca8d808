"""Background jobs: the record store (the queue), the job files and the manager's behaviour.

Every store and manager test runs against both backends:
* ``sqlite``: the embedded default, SQLite and the local data directory, one process;
* ``postgres``: a real PostgreSQL server and an S3 bucket (moto's server, through the S3 API),
  as the replicas of a scaled-out deployment share them.

No real pipeline here: a fake executor writes a tiny output file and, depending on the
job's (display) video file name, succeeds, fails, crashes, or blocks until released or
cancelled.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sqlite3
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from lipsync_runner.errors import (
    InsufficientStorageError,
    InvalidInputError,
    JobCancelledError,
    JobNotFinishedError,
    JobNotFoundError,
    QueueFullError,
)
from lipsync_runner.jobs import (
    INTERNAL_ERROR,
    OUTPUT_NAME,
    JobContext,
    JobFiles,
    JobKind,
    JobManager,
    JobOutcome,
    JobParams,
    JobRecord,
    JobStatus,
    JobStore,
    SQLiteJobStore,
    new_job_id,
    utcnow,
)
from lipsync_runner.storage import JobStorage, LocalStorage

BAD_IDS = [
    "../etc",
    "..",
    "",
    "abc",
    # fixed values, not uuid4() calls: pytest-xdist collects in each worker and needs the same ids
    "478657B5-9D26-4A66-89DE-BA081ADB7473",
    "\0",
    "95607072-63de-47a8-98f4-1cd218553f39\0",
    "918edcb1-36ba-46da-9767-107c80b488b4\n",
    "../2c218a6a-1731-445b-94e7-16b6809b7265",
    "c974d470-edb9-11f1-ad47-02fc00000001",  # a uuid, but not a v4 one
]


# -- the two backends ------------------------------------------------------------------------


@dataclass
class Backend:
    """Where jobs live: SQLite + the data dir, or PostgreSQL + a bucket (``prefix`` isolates a test)."""

    name: str
    database_url: str | None = None
    s3: object | None = None  # tests.backends.S3Server
    bucket: str | None = None
    prefix: str = ""

    @property
    def shared(self) -> bool:
        return self.database_url is not None

    def store(self, data_dir: Path) -> JobStore:
        if self.database_url:
            from lipsync_runner.jobs.postgres import PostgresJobStore

            return PostgresJobStore(self.database_url)
        return SQLiteJobStore(data_dir / "jobs.sqlite3")

    def storage(self, files: JobFiles) -> JobStorage:
        if self.bucket:
            from lipsync_runner.storage.s3 import S3Storage

            return S3Storage(self.bucket, self.prefix, endpoint_url=self.s3.endpoint_url, client=self.s3.client())
        return LocalStorage(files)

    def stored(self, data_dir: Path, job_id: str) -> set[str]:
        """Names of the job's stored files."""
        if self.bucket:
            root = f"{self.prefix}/jobs/{job_id}/"
            return {k[len(root):] for k in self.s3.keys(self.bucket, root)}
        directory = data_dir / "jobs" / job_id
        return {p.name for p in directory.iterdir()} if directory.is_dir() else set()

    def all_stored(self, data_dir: Path) -> set[str]:
        """Job ids that have anything stored."""
        if self.bucket:
            root = f"{self.prefix}/jobs/"
            return {k[len(root):].split("/")[0] for k in self.s3.keys(self.bucket, root)}
        return {p.name for p in (data_dir / "jobs").iterdir()} if (data_dir / "jobs").is_dir() else set()

    def put(self, data_dir: Path, job_id: str, name: str, data: bytes) -> None:
        """Store a file behind the manager's back (what a crash or another replica leaves)."""
        if self.bucket:
            self.s3.client().put_object(Bucket=self.bucket, Key=f"{self.prefix}/jobs/{job_id}/{name}", Body=data)
        else:
            directory = data_dir / "jobs" / job_id
            directory.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)

    def remove(self, data_dir: Path, job_id: str, name: str) -> None:
        if self.bucket:
            self.s3.client().delete_object(Bucket=self.bucket, Key=f"{self.prefix}/jobs/{job_id}/{name}")
        else:
            (data_dir / "jobs" / job_id / name).unlink()

    def leave_partial_write(self, data_dir: Path, job_id: str) -> None:
        """What a process killed while writing leaves: a temp file, or an unfinished multipart upload."""
        if self.bucket:
            self.s3.client().create_multipart_upload(Bucket=self.bucket, Key=f"{self.prefix}/jobs/{job_id}/output.mp4")
        else:
            (data_dir / "jobs" / job_id / f".{OUTPUT_NAME}.abcdef012345.part").write_bytes(b"half a video")

    def partial_writes(self, data_dir: Path, job_id: str) -> int:
        if self.bucket:
            uploads = self.s3.client().list_multipart_uploads(
                Bucket=self.bucket, Prefix=f"{self.prefix}/jobs/{job_id}/").get("Uploads", [])
            return len(uploads)
        return len(list((data_dir / "jobs" / job_id).glob(".*.part")))


@pytest.fixture(scope="module")
def _postgres_db(request):
    postgres = request.getfixturevalue("postgres")
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite")
    import psycopg

    url = request.getfixturevalue("_postgres_db")
    s3 = request.getfixturevalue("s3")
    with psycopg.connect(url, autocommit=True) as conn:  # every test starts from an empty queue
        if conn.execute("SELECT to_regclass('lipsync_jobs')").fetchone()[0] is not None:
            conn.execute("TRUNCATE lipsync_jobs, lipsync_uploads, lipsync_owners")
    global _BUCKET
    if _BUCKET is None:
        _BUCKET = s3.create_bucket()
    return Backend("postgres", database_url=url, s3=s3, bucket=_BUCKET, prefix=f"t-{uuid.uuid4().hex[:10]}")


_BUCKET: str | None = None


# -- helpers ---------------------------------------------------------------------------------


def eventually(predicate, timeout: float = 5.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


class FakeExecutor:
    """Behaviour by the job's video_filename: ok / fail / boom / block."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started: dict[str, threading.Event] = {}
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def started_event(self, job_id: str) -> threading.Event:
        with self._lock:
            return self.started.setdefault(job_id, threading.Event())

    def __call__(self, ctx: JobContext) -> JobOutcome:
        job = ctx.job
        with self._lock:
            self.calls.append(job.job_id)
        assert ctx.video_path.read_bytes() == b"video" and ctx.audio_path.read_bytes() == b"audio"
        mode = job.video_filename.split(".")[0]
        ctx.progress("audio", 0.0)
        self.started_event(job.job_id).set()
        if mode == "fail":
            raise InvalidInputError("face.mp4 has no video stream")
        if mode == "boom":
            raise RuntimeError("secret internal detail /opt/models")
        if mode == "block":
            ctx.progress("generate", 0.5)
            while not self.release.wait(0.01):
                if ctx.should_cancel():
                    raise JobCancelledError("the job was cancelled")
        if mode == "spam":
            for i in range(2000):
                ctx.progress("generate", i / 2000)
        ctx.output_path.write_bytes(b"result of " + job.job_id.encode())
        return JobOutcome(output_file=OUTPUT_NAME, frames=25, timings={"generate": 0.01})


def upload(manager: JobManager, name: str = "ok.mp4", owner: str | None = None) -> JobRecord:
    job_id, directory = manager.new_upload()
    (directory / "video.mp4").write_bytes(b"video")
    (directory / "audio.wav").write_bytes(b"audio")
    return manager.submit(job_id, video_file="video.mp4", audio_file="audio.wav", video_filename=name,
                          audio_filename="speech.wav", params=JobParams(bbox_shift=3), owner=owner)


def result(manager: JobManager, job_id: str) -> bytes:
    return manager.output_path(job_id).read_bytes()


@pytest.fixture
def executor():
    ex = FakeExecutor()
    yield ex
    ex.release.set()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def make_manager(data: Path, executor: FakeExecutor, backend: Backend):
    made: list[JobManager] = []

    def make(data_dir: Path | None = None, start: bool = True, execute=None, **kwargs) -> JobManager:
        kwargs.setdefault("orphan_grace_s", 0)
        data_dir = data_dir or data
        files = JobFiles(data_dir)
        m = JobManager(backend.store(data_dir), files, execute or executor, storage=backend.storage(files), **kwargs)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    executor.release.set()
    for m in made:
        m.close(timeout=5)


def fake_crash(backend: Backend, data_dir: Path, status: JobStatus, attempts: int, inputs: bool = True,
               **fields) -> JobRecord:
    """What a killed process leaves: a record in some state (a lease that ran out) and its inputs."""
    store = backend.store(data_dir)
    job_id = new_job_id()
    JobFiles(data_dir)  # the layout exists, as after any earlier run
    if inputs:
        backend.put(data_dir, job_id, "video.mp4", b"video")
        backend.put(data_dir, job_id, "audio.wav", b"audio")
    else:
        (data_dir / "jobs" / job_id).mkdir(parents=True, exist_ok=True)
    processing = status is JobStatus.processing
    rec = JobRecord(job_id=job_id, status=status, attempts=attempts, video_filename="ok.mp4",
                    audio_filename="speech.wav", video_file="video.mp4", audio_file="audio.wav",
                    started_at=utcnow() if processing else None,
                    lease_owner="dead-replica" if processing else None,
                    lease_expires_at=utcnow() - timedelta(seconds=1) if processing else None, **fields)
    store.create(rec)
    store.close()
    return rec


# -- the store -------------------------------------------------------------------------------


def record(owner: str | None = None, **fields) -> JobRecord:
    fields = {"video_filename": "v.mp4", "audio_filename": "a.wav", "video_file": "video.mp4",
              "audio_file": "audio.wav", **fields}
    return JobRecord(job_id=new_job_id(), owner=owner, **fields)


@pytest.fixture
def make_store(backend: Backend, data: Path):
    made: list[JobStore] = []

    def make() -> JobStore:
        store = backend.store(data)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_store_create_get_update_delete(make_store):
    store = make_store()
    rec = record(owner="alice")
    store.create(rec)
    assert store.get(rec.job_id) == rec
    with pytest.raises(ValueError):
        store.create(rec)

    updated = store.update(rec.job_id, status=JobStatus.processing, progress=0.25, stage="faces")
    assert (updated.status, updated.progress, updated.stage) == (JobStatus.processing, 0.25, "faces")
    assert store.get(rec.job_id) == updated
    with pytest.raises(ValueError):
        store.update(rec.job_id, no_such_field=1)
    with pytest.raises(ValueError):
        store.update(rec.job_id, progress=2.0)  # validated like any record
    with pytest.raises(ValueError):
        store.update(rec.job_id, job_id=new_job_id())
    with pytest.raises(JobNotFoundError):
        store.update(new_job_id(), progress=0.5)
    assert store.get(rec.job_id) == updated  # the refused updates changed nothing

    store.delete(rec.job_id)
    store.delete(rec.job_id)  # already gone: fine
    assert store.get(rec.job_id) is None


def test_store_modify_is_a_locked_read_modify_write(make_store):
    store = make_store()
    rec = record(timings={})
    store.create(rec)
    assert store.modify(rec.job_id, lambda cur, now: None) == rec  # no change asked: nothing written

    def bump(i: int) -> None:
        for _ in range(15):
            store.modify(rec.job_id, lambda cur, now: {"timings": {**cur.timings, "n": cur.timings.get("n", 0) + 1}})

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(rec.job_id).timings["n"] == 90  # no increment lost between threads

    with pytest.raises(RuntimeError, match="abort"):
        store.modify(rec.job_id, lambda cur, now: (_ for _ in ()).throw(RuntimeError("abort")))
    assert store.get(rec.job_id).timings["n"] == 90


def test_store_lists_newest_first_by_owner_and_status(make_store):
    store = make_store()
    base = utcnow()
    recs = [record(owner="alice" if i % 2 else "bob", created_at=base + timedelta(seconds=i)) for i in range(6)]
    for r in reversed(recs):  # insertion order must not matter
        store.create(r)
    store.update(recs[5].job_id, status=JobStatus.completed)

    assert [r.job_id for r in store.list()] == [r.job_id for r in reversed(recs)]
    assert [r.job_id for r in store.list(limit=2)] == [recs[5].job_id, recs[4].job_id]
    assert [r.job_id for r in store.list(owner="alice")] == [recs[5].job_id, recs[3].job_id, recs[1].job_id]
    assert [r.job_id for r in store.list(owner="alice", statuses={JobStatus.queued})] == [
        recs[3].job_id, recs[1].job_id]
    assert store.list(statuses=set()) == []
    assert store.count_by_status() == {"queued": 5, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0}


def test_store_lists_jobs_and_avatars_apart(make_store):
    store = make_store()
    base = utcnow()
    job = record(owner="alice", created_at=base)
    avatar = record(owner="alice", created_at=base + timedelta(seconds=1), kind=JobKind.avatar, audio_file=None,
                    audio_filename=None)
    for r in (job, avatar):
        store.create(r)
    assert [r.job_id for r in store.list(owner="alice", kind=JobKind.job)] == [job.job_id]
    assert [r.job_id for r in store.list(owner="alice", kind=JobKind.avatar)] == [avatar.job_id]
    assert [r.job_id for r in store.list(owner="alice")] == [avatar.job_id, job.job_id]  # every kind
    assert store.get(avatar.job_id) == avatar and store.update(avatar.job_id, stage="faces").kind is JobKind.avatar


def test_store_is_wal_versioned_and_persistent(tmp_path):
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    rec = record()
    store.create(rec)
    assert store.journal_mode == "wal"
    assert store.schema_version == 4  # 2: the queue's leases; 3: the kind column (avatars); 4: owners' turns
    store.close()
    with pytest.raises(RuntimeError):
        store.get(rec.job_id)

    reopened = SQLiteJobStore(path)
    assert reopened.get(rec.job_id) == rec
    reopened.close()

    conn = sqlite3.connect(path)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(jobs)")}
    assert {"jobs_status", "jobs_owner_created", "jobs_created", "jobs_expires", "jobs_queue", "jobs_leases"} <= indexes
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteJobStore(path)


def test_a_version_1_sqlite_store_is_migrated_with_its_records(tmp_path):
    """A data directory from before the queue (schema 1) opens, keeps its jobs and gains leases."""
    from lipsync_runner.jobs.store import _MIGRATIONS

    path = tmp_path / "jobs.sqlite3"
    old = record(status=JobStatus.processing, attempts=1)
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[1] + "; PRAGMA user_version = 1;")
    body = old.model_dump_json(exclude={"lease_owner", "lease_expires_at", "cancel_requested"})
    conn.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                 (old.job_id, "processing", None, old.created_at.timestamp(), None, body))
    conn.commit()
    conn.close()

    store = SQLiteJobStore(path)
    assert store.schema_version == 4  # and the kind column (avatars), the owners' turns
    assert store.get(old.job_id) == old  # the new fields take their defaults
    assert [r.job_id for r in store.lapsed()] == [old.job_id]  # no lease: a dead process's job
    store.close()


def test_store_expired_returns_only_finished_jobs_past_their_expiry(make_store):
    store = make_store()
    now = utcnow()
    old = record(status=JobStatus.completed, expires_at=now - timedelta(seconds=1))
    fresh = record(status=JobStatus.failed, expires_at=now + timedelta(hours=1))
    odd = record(status=JobStatus.processing, expires_at=now - timedelta(seconds=1))  # never swept while active
    for r in (old, fresh, odd):
        store.create(r)
    assert [r.job_id for r in store.expired(now)] == [old.job_id]


def test_store_is_safe_from_many_threads(make_store):
    store = make_store()
    rec = record(timings={})
    store.create(rec)
    errors = []

    def bump(i: int) -> None:
        try:
            for j in range(30):
                store.update(rec.job_id, stage=f"t{i}-{j}")
                store.get(rec.job_id)
                store.list(limit=5)
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=bump, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- the store as the queue ------------------------------------------------------------------


def test_claim_takes_the_oldest_queued_job_once_with_a_lease(make_store):
    store = make_store()
    base = utcnow()
    newer, older = record(created_at=base + timedelta(seconds=1)), record(created_at=base)
    done = record(status=JobStatus.completed, created_at=base - timedelta(seconds=1))
    for r in (newer, older, done):
        store.create(r)

    first = store.claim("replica-a", lease_s=30)
    assert first.job_id == older.job_id
    assert (first.status, first.stage, first.attempts, first.lease_owner) == (
        JobStatus.processing, "starting", 1, "replica-a")
    assert first.started_at is not None and first.lease_expires_at > utcnow() + timedelta(seconds=20)
    assert store.get(older.job_id) == first
    assert store.claim("replica-b", lease_s=30).job_id == newer.job_id
    assert store.claim("replica-b", lease_s=30) is None  # nothing queued: finished jobs are never claimed


def test_concurrent_claims_never_hand_out_a_job_twice(make_store):
    stores = [make_store() for _ in range(3)]  # with PostgreSQL: three connection pools, like three replicas
    ids = set()
    for _ in range(60):
        r = record()
        stores[0].create(r)
        ids.add(r.job_id)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(store: JobStore, name: str) -> None:
        while (rec := store.claim(name, lease_s=30)) is not None:
            with lock:
                claimed.append(rec.job_id)

    threads = [threading.Thread(target=worker, args=(stores[i % 3], f"r{i}")) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # every job once, none twice
    assert all(r.attempts == 1 for r in stores[1].list(limit=None))


def test_renew_extends_only_leases_still_held_and_reports_cancel_requests(make_store):
    store = make_store()
    a, b, c = record(), record(), record()
    for r in (a, b, c):
        store.create(r)
    held = [store.claim("me", lease_s=0.5) for _ in range(3)]
    store.update(b.job_id, cancel_requested=True)  # a cancel sent to another replica
    store.update(c.job_id, lease_owner="someone-else")  # taken over
    before = store.get(a.job_id).lease_expires_at

    assert store.renew("me", [r.job_id for r in held] + [new_job_id()], lease_s=60) == {a.job_id: False,
                                                                                         b.job_id: True}
    assert store.get(a.job_id).lease_expires_at > before + timedelta(seconds=30)
    assert store.renew("someone", [], lease_s=60) == {}


def test_lapsed_lists_processing_jobs_whose_lease_ran_out(make_store):
    store = make_store()
    short, long = record(), record()
    store.create(short)
    store.create(long)
    assert store.claim("a", lease_s=0.2).job_id == short.job_id
    assert store.claim("b", lease_s=60).job_id == long.job_id
    assert store.lapsed() == []
    time.sleep(0.4)
    assert [r.job_id for r in store.lapsed()] == [short.job_id]
    store.renew("a", [short.job_id], lease_s=60)  # a late heartbeat brings it back
    assert store.lapsed() == []


def test_upload_reservations_count_towards_admission_until_they_end(make_store):
    store, other = make_store(), make_store()  # two replicas' views of one queue (one store for SQLite)
    queued = record()
    store.create(queued)
    ups = [new_job_id() for _ in range(3)]
    assert store.reserve_upload(ups[0], "a", max_waiting=3, lease_s=30)[:2] == (True, 1)
    assert other.reserve_upload(ups[1], "b", max_waiting=3, lease_s=30)[:2] == (True, 2)
    assert store.reserve_upload(ups[2], "a", max_waiting=3, lease_s=30)[:2] == (False, 3)  # full, on every replica
    assert store.uploads() == {ups[0], ups[1]}

    other.release_upload(ups[1])  # discarded
    assert store.reserve_upload(ups[2], "a", max_waiting=3, lease_s=0.3)[:2] == (True, 2)
    store.create(JobRecord(job_id=ups[0], video_filename="v", audio_filename="a", video_file="v.mp4",
                           audio_file="a.wav"))
    assert store.uploads() == {ups[2]}  # submitted: the reservation became the queued job
    store.renew_uploads("a", [ups[2]], lease_s=0.3)
    time.sleep(0.5)  # not renewed again: the uploading replica died
    assert store.uploads() == set()
    assert store.reserve_upload(new_job_id(), "b", max_waiting=3, lease_s=30)[:2] == (True, 2)


def test_exclusive_is_held_by_one_holder_at_a_time(backend, make_store):
    store, other = make_store(), make_store()
    with store.exclusive("sweep") as first:
        assert first is True
        with other.exclusive("sweep") as second:
            assert second is (not backend.shared)  # SQLite: one process owns the store anyway
        with other.exclusive("something else") as unrelated:
            assert unrelated is True
    with other.exclusive("sweep") as again:
        assert again is True


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_malformed_job_ids_are_not_found_without_touching_the_filesystem(tmp_path, bad, make_manager):
    files = JobFiles(tmp_path / "files")
    manager = make_manager(start=False)  # no background threads touching files meanwhile
    with pytest.MonkeyPatch.context() as mp:
        _forbid_fs(mp)
        for call in (
            lambda: files.job_dir(bad),
            lambda: files.job_dir(bad, create=True),
            lambda: files.output_path(bad),
            lambda: files.temp_output_path(bad),
            lambda: files.remove(bad),
            lambda: manager.get(bad),
            lambda: manager.output_path(bad),
            lambda: manager.cancel(bad),
            lambda: manager.cleanup(bad),
            lambda: manager.wait(bad, timeout=0),
            lambda: manager.discard_upload(bad),
        ):
            with pytest.raises(JobNotFoundError):
                call()
        with pytest.raises(JobNotFoundError):
            asyncio.run(manager.wait_async(bad, timeout=0))
    assert list((tmp_path / "data" / "jobs").iterdir()) == []
    assert list((tmp_path / "files" / "jobs").iterdir()) == []


def _forbid_fs(mp: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("touched the filesystem with a malformed job id")

    for name in ("exists", "mkdir", "stat", "lstat", "is_dir", "is_file", "iterdir", "unlink", "rmdir"):
        mp.setattr(pathlib.Path, name, forbidden)
    mp.setattr(os, "stat", forbidden)
    mp.setattr(os, "lstat", forbidden)
    mp.setattr(os, "mkdir", forbidden)
    mp.setattr("shutil.rmtree", forbidden)


def test_job_files_layout_and_orphans(tmp_path):
    files = JobFiles(tmp_path)
    known, stale, orphan = new_job_id(), new_job_id(), new_job_id()
    d = files.job_dir(known, create=True)
    assert d == tmp_path / "jobs" / known and d.is_dir()
    assert files.output_path(known) == d / OUTPUT_NAME
    assert files.temp_output_path(known).parent == d
    files.job_dir(stale, create=True)
    files.job_dir(orphan, create=True)
    part = d / f".{OUTPUT_NAME}.0123456789ab.part"  # what the video writer leaves when killed
    frames = d / "frames-x1y2.rgb"  # the frame store's scratch file
    for p in (part, frames, d / "video.mp4", files.job_dir(stale) / f".{OUTPUT_NAME}.1.part"):
        p.write_bytes(b"x")
    (tmp_path / "jobs" / "not-a-job").mkdir()  # not ours to judge: left alone

    found = files.orphans(known_ids={known, stale}, active_ids={stale})
    assert sorted(found) == sorted([files.job_dir(orphan), part, frames])
    assert files.orphans(known_ids={known, stale}, active_ids={stale}, min_age_s=3600) == []
    for p in found:
        files.remove_orphan(p)
    assert sorted(p.name for p in d.iterdir()) == ["video.mp4"]
    assert not files.job_dir(orphan).exists() and (tmp_path / "jobs" / "not-a-job").is_dir()

    files.remove(known)
    files.remove(known)  # already gone: fine
    assert not d.exists()


def test_free_space_check(tmp_path):
    files = JobFiles(tmp_path)
    assert files.free_bytes() > 0
    files.check_free_space(0)
    files.check_free_space(1)
    with pytest.raises(InsufficientStorageError, match="disk space") as e:
        files.check_free_space(10**18)
    assert e.value.http_status == 507 and str(tmp_path) not in e.value.message


# -- the manager: lifecycle ------------------------------------------------------------------


def test_job_goes_queued_processing_completed_with_progress_midway(make_manager, executor):
    manager = make_manager(retention_s=3600)
    rec = upload(manager, "block.mp4", owner="alice")
    assert rec.status is JobStatus.queued and rec.params.bbox_shift == 3

    executor.started_event(rec.job_id).wait(5)
    running = eventually(lambda: (r := manager.get(rec.job_id)).stage == "generate" and r)
    assert running.status is JobStatus.processing and running.progress == 0.5 and running.attempts == 1
    assert running.started_at is not None
    stored = eventually(lambda: (r := manager.store.get(rec.job_id)).stage == "generate" and r)
    assert stored.progress == 0.5  # the store sees it too (a stage change is written at once)
    with pytest.raises(JobNotFinishedError, match="processing"):
        manager.output_path(rec.job_id)

    executor.release.set()
    done = manager.wait(rec.job_id, timeout=5)
    assert done.status is JobStatus.completed and done.progress == 1.0 and done.stage == "done"
    assert done.frames == 25 and done.output_file == OUTPUT_NAME and done.error is None
    assert {"generate", "queue_s", "total_s"} <= set(done.timings)
    assert done.timings["total_s"] >= done.timings["queue_s"] >= 0
    assert done.expires_at - done.completed_at == timedelta(seconds=3600)
    assert manager.output_path(rec.job_id, owner="alice").read_bytes() == b"result of " + rec.job_id.encode()
    assert manager.counts()["completed"] == 1


def test_progress_writes_are_throttled(make_manager, executor):
    manager = make_manager()
    writes = Counter()
    real_modify = manager.store.modify

    def counting_modify(job_id, change):
        def counted(current, now):
            fields = change(current, now)
            if fields and set(fields) == {"stage", "progress"}:
                writes[job_id] += 1
            return fields

        return real_modify(job_id, counted)

    manager.store.modify = counting_modify
    rec = upload(manager, "spam.mp4")
    assert manager.wait(rec.job_id, timeout=5).status is JobStatus.completed
    assert 1 <= writes[rec.job_id] <= 5  # 2001 progress calls in two stages


def test_a_failing_job_records_its_message_and_others_still_complete(make_manager):
    manager = make_manager(workers=2)
    bad = upload(manager, "fail.mp4")
    good = [upload(manager) for _ in range(3)]
    failed = manager.wait(bad.job_id, timeout=5)
    assert failed.status is JobStatus.failed
    assert failed.error == "face.mp4 has no video stream" and failed.expires_at is not None
    assert all(manager.wait(r.job_id, timeout=5).status is JobStatus.completed for r in good)
    with pytest.raises(JobNotFinishedError, match="failed.*no video stream"):
        manager.output_path(bad.job_id)


@pytest.mark.parametrize("debug", [False, True])
def test_internal_errors_are_hidden_unless_debug(make_manager, debug, caplog):
    manager = make_manager(debug=debug)
    rec = upload(manager, "boom.mp4")
    after = upload(manager)
    failed = manager.wait(rec.job_id, timeout=5)
    assert failed.status is JobStatus.failed
    if debug:
        assert failed.error.startswith(INTERNAL_ERROR) and "secret internal detail" in failed.error
    else:
        assert failed.error == INTERNAL_ERROR
    assert "secret internal detail" in caplog.text  # always in the log, with its traceback
    assert manager.wait(after.job_id, timeout=5).status is JobStatus.completed


def test_cancel_a_queued_job(make_manager, executor):
    manager = make_manager(workers=1)
    blocker = upload(manager, "block.mp4")
    executor.started_event(blocker.job_id).wait(5)
    queued = upload(manager)
    cancelled = manager.cancel(queued.job_id)
    assert cancelled.status is JobStatus.cancelled and cancelled.completed_at is not None
    assert manager.cancel(queued.job_id) == cancelled  # finished: unchanged
    executor.release.set()
    assert manager.wait(blocker.job_id, timeout=5).status is JobStatus.completed
    assert queued.job_id not in executor.calls
    with pytest.raises(JobNotFinishedError, match="cancelled"):
        manager.output_path(queued.job_id)


def test_cancel_a_running_job(make_manager, executor, backend, data):
    manager = make_manager()
    rec = upload(manager, "block.mp4")
    executor.started_event(rec.job_id).wait(5)
    answer = manager.cancel(rec.job_id)
    assert answer.status is JobStatus.processing and answer.stage == "cancelling"
    done = manager.wait(rec.job_id, timeout=5)
    assert done.status is JobStatus.cancelled and done.output_file is None
    assert not manager.files.output_path(rec.job_id).exists()
    assert backend.stored(data, rec.job_id) == {"video.mp4", "audio.wav"}  # no output stored


def test_cancel_a_finished_job_changes_nothing(make_manager):
    manager = make_manager()
    rec = upload(manager)
    done = manager.wait(rec.job_id, timeout=5)
    assert manager.cancel(rec.job_id) == done
    assert manager.output_path(rec.job_id).is_file()


def test_cleanup_removes_files_and_record(make_manager, executor, backend, data):
    manager = make_manager(workers=1)
    finished = upload(manager)
    manager.wait(finished.job_id, timeout=5)
    running = upload(manager, "block.mp4")
    executor.started_event(running.job_id).wait(5)
    queued = upload(manager)

    for rec in (finished, queued, running):
        manager.cleanup(rec.job_id)
        with pytest.raises(JobNotFoundError):  # gone at once, whatever its state
            manager.get(rec.job_id)
        assert manager.store.get(rec.job_id) is None
    assert backend.stored(data, finished.job_id) == set() and not manager.files.job_dir(finished.job_id).exists()
    assert backend.stored(data, queued.job_id) == set()
    # the running one: its worker sees the cancel, then its files go
    eventually(lambda: not manager.files.job_dir(running.job_id).exists())
    assert backend.stored(data, running.job_id) == set()
    assert queued.job_id not in executor.calls
    assert manager.list() == [] and list(manager.files.root.iterdir()) == [] and backend.all_stored(data) == set()
    later = upload(manager)  # the worker is free again
    assert manager.wait(later.job_id, timeout=5).status is JobStatus.completed


def test_output_path_is_409_until_completed_with_the_file(make_manager, executor, backend, data):
    manager = make_manager(workers=1)
    blocker = upload(manager, "block.mp4")
    executor.started_event(blocker.job_id).wait(5)
    queued = upload(manager)
    with pytest.raises(JobNotFinishedError, match="queued") as e:
        manager.output_path(queued.job_id)
    assert e.value.http_status == 409
    executor.release.set()
    manager.wait(queued.job_id, timeout=5)
    assert manager.output_path(queued.job_id).read_bytes() == b"result of " + queued.job_id.encode()
    backend.remove(data, queued.job_id, OUTPUT_NAME)  # removed behind our back
    for call in (manager.output_path, manager.open_output):
        with pytest.raises(JobNotFinishedError, match="no longer available"):
            call(queued.job_id)


def test_open_output_streams_any_byte_range_of_the_stored_result(make_manager, backend):
    manager = make_manager()
    rec = upload(manager)
    manager.wait(rec.job_id, timeout=5)
    expected = b"result of " + rec.job_id.encode()
    stored = manager.open_output(rec.job_id)
    assert stored.size == len(expected)
    assert b"".join(stored.iter_range(0, stored.size)) == expected
    assert b"".join(stored.iter_range(7, 12)) == expected[7:12]
    assert (stored.local_path is not None) is (backend.name == "sqlite")  # a local file is served as a file
    assert stored.redirect_url("x.mp4") is None  # presigned redirects are off unless configured


def test_what_admission_stored_with_a_job_is_served_by_any_replica(make_manager, backend, tmp_path, data):
    """The thumbnail (any other file admission left in the upload directory) and the media summary
    travel with the job: with a bucket, a replica that never saw the upload serves them."""
    removed: list[str] = []
    manager = make_manager(workers=1, on_removed=removed.append)
    other = make_manager(tmp_path / "b", on_removed=removed.append) if backend.shared else manager
    job_id, directory = manager.new_upload()
    for name, content in (("video.mp4", b"video"), ("audio.wav", b"audio"), ("thumbnail.jpg", b"jpeg")):
        (directory / name).write_bytes(content)
    media = {"video": {"duration_s": 2.0, "width": 320, "height": 240, "fps": "25/1"}}
    manager.submit(job_id, video_file="video.mp4", audio_file="audio.wav", video_filename="ok.mp4",
                   audio_filename="speech.wav", params=JobParams(), owner="alice", media=media)
    assert backend.stored(data, job_id) >= {"video.mp4", "audio.wav", "thumbnail.jpg"}
    assert other.get(job_id).media == media
    stored = other.open_file(job_id, "thumbnail.jpg", owner="alice")
    assert b"".join(stored.iter_range(0, stored.size)) == b"jpeg"
    assert other.input_path(job_id, "video.mp4", owner="alice").read_bytes() == b"video"
    for name, owner in (("thumbnail.jpg", "bob"), ("missing.jpg", "alice"), ("../jobs.sqlite3", "alice")):
        with pytest.raises(JobNotFoundError):
            other.open_file(job_id, name, owner=owner)
        with pytest.raises(JobNotFoundError):
            other.input_path(job_id, name, owner=owner)
    manager.wait(job_id, timeout=5)
    other.cleanup(job_id, owner="alice")
    assert removed == [job_id] and backend.stored(data, job_id) == set()


def test_jobs_are_scoped_to_their_owner(make_manager):
    manager = make_manager()
    alices = upload(manager, owner="alice")
    bobs = upload(manager, owner="bob")
    manager.wait(alices.job_id, timeout=5)
    manager.wait(bobs.job_id, timeout=5)

    assert manager.get(alices.job_id, owner="alice").job_id == alices.job_id
    assert manager.get(alices.job_id).job_id == alices.job_id  # no owner given: no scoping (admin)
    for call in (manager.get, manager.output_path, manager.cancel, manager.cleanup):
        with pytest.raises(JobNotFoundError) as e:
            call(alices.job_id, owner="bob")
        assert e.value.http_status == 404
    assert [r.job_id for r in manager.list(owner="bob")] == [bobs.job_id]
    assert {r.job_id for r in manager.list()} == {alices.job_id, bobs.job_id}
    assert manager.output_path(alices.job_id, owner="alice").is_file()  # bob's cleanup did nothing


def test_admission_refuses_when_the_queue_is_full(make_manager, executor, backend, data):
    manager = make_manager(workers=1, max_queued=2)
    blocker = upload(manager, "block.mp4")
    executor.started_event(blocker.job_id).wait(5)
    waiting = [upload(manager), upload(manager)]
    before = (sorted(manager.files.root.iterdir()), backend.all_stored(data))
    with pytest.raises(QueueFullError) as e:
        manager.new_upload()
    assert e.value.http_status == 429 and e.value.retry_after_s >= 1
    assert (sorted(manager.files.root.iterdir()), backend.all_stored(data)) == before  # nothing for the refused one

    manager.cancel(waiting[0].job_id)
    job_id, directory = manager.new_upload()  # a slot is free again ...
    with pytest.raises(QueueFullError):  # ... and an upload in progress holds it
        manager.new_upload()
    manager.discard_upload(job_id)
    assert not directory.exists()
    manager.new_upload()


def test_free_space_floor_refuses_new_uploads(make_manager):
    manager = make_manager(free_space_floor_bytes=10**18)
    with pytest.raises(InsufficientStorageError) as e:
        manager.new_upload()
    assert e.value.http_status == 507
    assert list(manager.files.root.iterdir()) == []


def test_submit_requires_the_uploaded_files(make_manager):
    manager = make_manager()
    job_id, directory = manager.new_upload()
    (directory / "video.mp4").write_bytes(b"video")
    for video, audio in (("video.mp4", "audio.wav"), ("../video.mp4", "video.mp4"), (".hidden", "video.mp4")):
        with pytest.raises(ValueError):
            manager.submit(job_id, video_file=video, audio_file=audio, video_filename="v", audio_filename="a",
                           params=JobParams())
    assert manager.store.get(job_id) is None


def test_wait_async_does_not_block_the_event_loop(make_manager, executor):
    manager = make_manager()
    rec = upload(manager, "block.mp4")

    async def scenario():
        ticks = 0
        waiter = asyncio.create_task(manager.wait_async(rec.job_id, timeout=5))
        for _ in range(10):
            await asyncio.sleep(0.01)
            ticks += 1
        assert not waiter.done()
        unfinished = await manager.wait_async(rec.job_id, timeout=0.05)
        executor.release.set()
        return ticks, unfinished, await waiter

    ticks, unfinished, done = asyncio.run(scenario())
    assert ticks == 10 and unfinished.status is JobStatus.processing
    assert done.status is JobStatus.completed


def test_concurrent_submits_are_each_processed_exactly_once(make_manager, executor, backend):
    manager = make_manager(workers=3, max_queued=1000)
    submitted, errors = [], []
    clients, each = (6, 8) if backend.name == "sqlite" else (4, 5)  # a bucket round trip per file: fewer

    def client() -> None:
        try:
            for _ in range(each):
                submitted.append(upload(manager).job_id)
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(submitted)) == clients * each
    for job_id in submitted:
        assert manager.wait(job_id, timeout=20).status is JobStatus.completed
    assert sorted(executor.calls) == sorted(submitted)  # each exactly once
    assert manager.counts()["completed"] == clients * each


# -- restarts --------------------------------------------------------------------------------


def test_a_job_interrupted_by_a_crash_is_requeued_and_completes(backend, data, make_manager, executor):
    crashed = fake_crash(backend, data, JobStatus.processing, attempts=1)
    manager = make_manager(data, max_attempts=2)
    done = manager.wait(crashed.job_id, timeout=5)
    assert done.status is JobStatus.completed and done.attempts == 2
    assert done.lease_owner == manager.replica_id and done.lease_expires_at is None
    assert executor.calls == [crashed.job_id]


def test_a_job_out_of_attempts_fails_with_a_clear_reason(backend, data, make_manager, executor):
    crashed = fake_crash(backend, data, JobStatus.processing, attempts=2)
    no_inputs = fake_crash(backend, data, JobStatus.processing, attempts=1, inputs=False)
    manager = make_manager(data, max_attempts=2)
    failed = manager.get(crashed.job_id)
    assert failed.status is JobStatus.failed
    assert failed.error == "the server stopped while the job was running (attempt 2 of 2)"
    assert failed.expires_at is not None
    assert manager.get(no_inputs.job_id).status is JobStatus.failed
    assert "input files" in manager.get(no_inputs.job_id).error
    assert executor.calls == []


def test_queued_jobs_are_requeued_in_creation_order(backend, data, make_manager, executor):
    base = utcnow()
    recs = [fake_crash(backend, data, JobStatus.queued, attempts=0, created_at=base + timedelta(seconds=s))
            for s in (3, 1, 2)]
    interrupted = fake_crash(backend, data, JobStatus.processing, attempts=1, created_at=base)
    manager = make_manager(data, workers=1)
    for r in (*recs, interrupted):
        done = manager.wait(r.job_id, timeout=5)
        assert done.status is JobStatus.completed, (done.status, done.error, done.attempts)  # why, if not
    assert executor.calls == [interrupted.job_id, recs[1].job_id, recs[2].job_id, recs[0].job_id]


def test_finished_jobs_survive_a_restart_and_orphans_do_not(backend, data, make_manager, executor):
    first = make_manager(data)
    done = upload(first)
    first.wait(done.job_id, timeout=5)
    failed = upload(first, "fail.mp4")
    first.wait(failed.job_id, timeout=5)
    first.close()

    orphan = new_job_id()
    backend.put(data, orphan, "video.mp4", b"video")  # stored, but its record never got written
    backend.leave_partial_write(data, done.job_id)
    assert backend.partial_writes(data, done.job_id) == 1

    # SQLite: one process owns the store, so at start nothing runs anywhere and the grace does not
    # apply. Shared: another replica may be between storing inputs and recording its job: grace applies.
    second = make_manager(data, orphan_grace_s=3600)
    assert second.get(done.job_id).status is JobStatus.completed
    assert result(second, done.job_id) == b"result of " + done.job_id.encode()
    assert second.get(failed.job_id).error == "face.mp4 has no video stream"
    if backend.shared:
        assert orphan in backend.all_stored(data)
        deadline = time.monotonic() + 10
        # the manager's own sweep at start (with the grace) may hold the fleet's sweep lock a moment,
        # and a sweep that finds it taken leaves the stored orphans to the holder: sweep until it is free
        while second.sweep(orphan_grace_s=0) == 0 and orphan in backend.all_stored(data):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert orphan not in backend.all_stored(data) and backend.partial_writes(data, done.job_id) == 0
    assert backend.stored(data, done.job_id) == {"video.mp4", "audio.wav", OUTPUT_NAME}
    assert executor.calls.count(done.job_id) == 1  # finished jobs are not run again


def test_stop_leaves_a_running_job_processing_for_the_next_start(make_manager, executor):
    manager = make_manager()
    rec = upload(manager, "block.mp4")
    executor.started_event(rec.job_id).wait(5)
    manager.stop(timeout=0.1)
    assert manager.store.get(rec.job_id).status is JobStatus.processing  # not cancelled
    executor.release.set()  # here the process lives on, so the job simply finishes
    assert manager.wait(rec.job_id, timeout=5).status is JobStatus.completed
    manager.start()  # again: idempotent, nothing re-run
    manager.start()
    later = upload(manager)
    assert manager.wait(later.job_id, timeout=5).status is JobStatus.completed
    assert executor.calls.count(rec.job_id) == 1


def test_one_manager_per_sqlite_data_directory(backend, data, make_manager):
    if backend.shared:
        pytest.skip("a shared store is for many managers: see test_two_replicas_share_one_queue")
    make_manager(data)
    with pytest.raises(RuntimeError, match="already using"):
        make_manager(data)


def test_close_releases_the_data_directory_last_after_the_running_job(backend, data, make_manager, executor):
    """Issue 11: close() used to drop the lock while a worker ran; a new process then removed the live
    job's files as orphans. The lock (and the store) now go after the last worker."""
    if backend.shared:
        pytest.skip("no data-directory lock with a shared store: leases protect running jobs")
    manager = make_manager(data)
    rec = upload(manager, "block.mp4")
    executor.started_event(rec.job_id).wait(5)
    manager.close(timeout=0.1)
    with pytest.raises(RuntimeError, match="already using"):  # the job still runs: the directory is taken
        make_manager(data, start=False).start()
    executor.release.set()
    eventually(lambda: not manager._running)
    successor = make_manager(data)  # now free; the job finished and was recorded before the store closed
    done = successor.get(rec.job_id)
    assert done.status is JobStatus.completed and result(successor, rec.job_id).startswith(b"result of")


class FlakyFinalWrites:
    """A store whose final job writes (the ones that set completed_at) fail the first ``n`` times."""

    def __init__(self, manager: JobManager, n: int) -> None:
        self.left, self.failed = n, 0
        self.real = manager.store.modify
        manager.store.modify = self.modify

    def modify(self, job_id, change):
        def guarded(current, now):
            fields = change(current, now)
            if fields and "completed_at" in fields and self.left > 0:
                self.left -= 1
                self.failed += 1
                raise RuntimeError("database is locked")
            return fields

        return self.real(job_id, guarded)


def test_a_failed_final_write_is_retried(make_manager, monkeypatch):
    monkeypatch.setattr("lipsync_runner.jobs.manager.time.sleep", lambda s: None)  # the retry back-off
    manager = make_manager()
    flaky = FlakyFinalWrites(manager, n=2)
    rec = upload(manager)
    done = manager.wait(rec.job_id, timeout=5)
    assert done.status is JobStatus.completed and flaky.failed == 2


def test_a_job_whose_end_cannot_be_recorded_is_recovered_through_its_lease(make_manager, executor, monkeypatch):
    """Every final write fails: the job must not stay 'processing' for good. Its lease runs out, the
    queue takes it back, and the second attempt is recorded once the store works again."""
    monkeypatch.setattr("lipsync_runner.jobs.manager.FINAL_WRITE_ATTEMPTS", 2)
    manager = make_manager(lease_s=0.6, max_attempts=2)
    flaky = FlakyFinalWrites(manager, n=2)  # both writes of the first attempt
    rec = upload(manager)
    done = manager.wait(rec.job_id, timeout=10)
    assert done.status is JobStatus.completed and done.attempts == 2 and flaky.failed == 2
    assert executor.calls == [rec.job_id, rec.job_id]


# -- several replicas on one shared store ----------------------------------------------------


@pytest.fixture
def replicas(backend, tmp_path, make_manager):
    """Two managers on one PostgreSQL store and one bucket, each with its own local data directory."""
    if not backend.shared:
        pytest.skip("replicas need a shared store")

    def make(**kwargs) -> tuple[JobManager, JobManager]:
        return (make_manager(tmp_path / "a", replica_id="replica-a", **kwargs),
                make_manager(tmp_path / "b", replica_id="replica-b", **kwargs))

    return make


def test_two_replicas_share_one_queue(replicas, executor, backend, data):
    a, b = replicas(workers=1, max_queued=4)
    first = upload(a, "block.mp4")
    second = upload(a, "block.mp4")
    executor.started_event(first.job_id).wait(5)
    executor.started_event(second.job_id).wait(5)
    owners = {a.store.get(j).lease_owner for j in (first.job_id, second.job_id)}
    assert owners == {"replica-a", "replica-b"}  # one worker each: B took the job A could not
    # admission counts the whole queue: two uploads on A and two on B fill it
    held = [a.new_upload(), a.new_upload(), b.new_upload(), b.new_upload()]
    with pytest.raises(QueueFullError):
        b.new_upload()
    for job_id, _ in held:
        (a if job_id in a._uploads else b).discard_upload(job_id)
    on_a = first if first.job_id in a._running else second

    async def wait_on_b():  # wait=true on the replica that does not run the job
        waiter = asyncio.create_task(b.wait_async(on_a.job_id, timeout=10))
        await asyncio.sleep(0.1)
        executor.release.set()
        return await waiter

    assert asyncio.run(wait_on_b()).status is JobStatus.completed
    for job in (first, second):
        assert b.wait(job.job_id, timeout=5).status is JobStatus.completed
        assert b.open_output(job.job_id).size == len(b"result of " + job.job_id.encode())
    assert [r.job_id for r in b.list()] == [second.job_id, first.job_id]


def test_cancel_and_cleanup_on_one_replica_stop_the_job_running_on_the_other(replicas, executor, backend):
    a, b = replicas(workers=1, lease_s=1.5)
    first = upload(a, "block.mp4")
    executor.started_event(first.job_id).wait(5)
    runner, other = (a, b) if first.job_id in a._running else (b, a)
    answer = other.cancel(first.job_id)  # sent to the replica that does not run it
    assert answer.status is JobStatus.processing and answer.stage == "cancelling"
    start = time.monotonic()
    assert other.wait(first.job_id, timeout=5).status is JobStatus.cancelled
    assert time.monotonic() - start < 3  # within a heartbeat or two

    second = upload(runner, "block.mp4")
    eventually(lambda: second.job_id in a._running or second.job_id in b._running)
    runner, other = (a, b) if second.job_id in a._running else (b, a)
    other.cleanup(second.job_id)
    with pytest.raises(JobNotFoundError):
        runner.get(second.job_id)
    eventually(lambda: second.job_id not in runner._running, timeout=5)
    assert backend.all_stored(None) == {first.job_id}  # the removed job left nothing in the bucket
    assert not runner.files.job_dir(second.job_id).exists()  # nor in the runner's scratch


def test_a_stalled_replica_loses_its_job_to_another_and_cannot_record_it(replicas, executor, backend):
    a, b = replicas(workers=1, lease_s=0.6, max_attempts=3)
    a.stop(timeout=0)  # only A takes the job ...
    b.stop(timeout=0)
    a.start()
    rec = upload(a, "block.mp4")
    executor.started_event(rec.job_id).wait(5)
    a._store.renew = lambda holder, ids, lease_s: {}  # ... then A stalls: its renewals stop reaching the store
    b.start()
    taken = eventually(lambda: (r := b.store.get(rec.job_id)).lease_owner == "replica-b" and r, timeout=5)
    assert taken.attempts == 2
    eventually(lambda: rec.job_id not in a._running, timeout=5)  # A noticed, and gave up its attempt
    executor.release.set()
    done = b.wait(rec.job_id, timeout=5)
    assert done.status is JobStatus.completed and done.attempts == 2
    assert backend.stored(None, rec.job_id) == {"video.mp4", "audio.wav", OUTPUT_NAME}  # one output


def test_the_sweep_runs_on_one_replica_at_a_time(replicas, backend):
    a, b = replicas(retention_s=60)
    rec = upload(a)
    a.wait(rec.job_id, timeout=5)
    later = utcnow() + timedelta(seconds=61)
    with a.store.exclusive("sweep"):  # A is sweeping right now ...
        assert b.sweep(now=later) == 0  # ... so B leaves expiry to it
        assert b.get(rec.job_id).status is JobStatus.completed
    assert b.sweep(now=later) == 1
    assert backend.all_stored(None) == set()



def test_a_job_claimed_while_the_sweep_lists_scratch_keeps_its_scratch(backend, data, make_manager):
    """With a bucket, a replica's sweep removes the local scratch of jobs it does not run. A worker
    that claims a job between the sweep's look at what runs and the removal keeps its directory (with
    no grace, as the tests run the sweep, this raced a just-claimed job's staged inputs away)."""
    if not backend.bucket:
        pytest.skip("with local storage the job directories are the storage, never swept as scratch")
    from lipsync_runner.jobs.shared import Running

    manager = make_manager(data, start=False)
    s = manager._shared
    claimed, idle = new_job_id(), new_job_id()
    for job_id in (claimed, idle):
        (s.files.job_dir(job_id, create=True) / "video.mp4").write_bytes(b"video")
    listed = s.files.orphans

    def orphans_while_a_worker_claims(*args, **kwargs):
        found = listed(*args, **kwargs)
        with s.lock:
            s.running[claimed] = Running(claimed)  # a worker claims it now, as a worker does
        return found

    s.files.orphans = orphans_while_a_worker_claims
    manager._sweeper._remove_local_orphans(0.0)
    assert (s.files.job_dir(claimed) / "video.mp4").read_bytes() == b"video"
    assert not s.files.job_dir(idle).exists()  # scratch of a job nobody runs here still goes
    s.running.pop(claimed)


# -- expiry ----------------------------------------------------------------------------------


def test_sweep_removes_expired_jobs_and_orphans(make_manager, executor, backend, data):
    manager = make_manager(retention_s=60, workers=1)
    old = upload(manager)
    manager.wait(old.job_id, timeout=5)
    running = upload(manager, "block.mp4")
    executor.started_event(running.job_id).wait(5)
    orphan = new_job_id()
    backend.put(data, orphan, "video.mp4", b"video")
    upload_id, upload_dir = manager.new_upload()  # an upload in progress is not an orphan

    assert manager.sweep() == 1  # not expired yet: only the orphan
    assert manager.get(old.job_id) and orphan not in backend.all_stored(data) and upload_dir.exists()

    assert manager.sweep(now=utcnow() + timedelta(seconds=61)) == 1
    with pytest.raises(JobNotFoundError):
        manager.get(old.job_id)
    assert backend.stored(data, old.job_id) == set() and not manager.files.job_dir(old.job_id).exists()
    assert manager.get(running.job_id).status is JobStatus.processing  # running jobs never expire
    assert backend.stored(data, running.job_id) == {"video.mp4", "audio.wav"}
    assert manager.files.job_dir(running.job_id).exists() and upload_dir.exists()


def test_the_background_sweeper_runs_by_itself(make_manager, backend, data):
    manager = make_manager(retention_s=0, sweep_interval_s=0.05)
    rec = upload(manager)
    eventually(lambda: manager.store.get(rec.job_id) is None)
    eventually(lambda: backend.stored(data, rec.job_id) == set())
