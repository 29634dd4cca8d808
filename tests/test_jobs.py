"""Background jobs: the record store, the on-disk layout and the manager's behaviour.

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
    JobManager,
    JobOutcome,
    JobParams,
    JobRecord,
    JobStatus,
    SQLiteJobStore,
    new_job_id,
    utcnow,
)

BAD_IDS = [
    "../etc",
    "..",
    "",
    "abc",
    str(uuid.uuid4()).upper(),
    "\0",
    str(uuid.uuid4()) + "\0",
    str(uuid.uuid4()) + "\n",
    "../" + str(uuid.uuid4()),
    str(uuid.uuid1()),  # a uuid, but not a v4 one
]


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


@pytest.fixture
def executor():
    ex = FakeExecutor()
    yield ex
    ex.release.set()


@pytest.fixture
def make_manager(tmp_path: Path, executor: FakeExecutor):
    made: list[JobManager] = []

    def make(data_dir: Path | None = None, start: bool = True, execute=None, **kwargs) -> JobManager:
        kwargs.setdefault("orphan_grace_s", 0)
        m = JobManager.from_data_dir(data_dir or tmp_path / "data", execute or executor, **kwargs)
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    executor.release.set()
    for m in made:
        m.close(timeout=5)


def fake_crash(data_dir: Path, status: JobStatus, attempts: int, inputs: bool = True, **fields) -> JobRecord:
    """What a killed process leaves: a record in some state and the job's directory."""
    files = JobFiles(data_dir)
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    job_id = new_job_id()
    directory = files.job_dir(job_id, create=True)
    if inputs:
        (directory / "video.mp4").write_bytes(b"video")
        (directory / "audio.wav").write_bytes(b"audio")
    rec = JobRecord(job_id=job_id, status=status, attempts=attempts, video_filename="ok.mp4",
                    audio_filename="speech.wav", video_file="video.mp4", audio_file="audio.wav",
                    started_at=utcnow() if status is JobStatus.processing else None, **fields)
    store.create(rec)
    store.close()
    return rec


# -- the store -------------------------------------------------------------------------------


def record(owner: str | None = None, **fields) -> JobRecord:
    return JobRecord(job_id=new_job_id(), owner=owner, video_filename="v.mp4", audio_filename="a.wav",
                     video_file="video.mp4", audio_file="audio.wav", **fields)


def test_store_create_get_update_delete(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.db")
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
    with pytest.raises(JobNotFoundError):
        store.update(new_job_id(), progress=0.5)

    store.delete(rec.job_id)
    store.delete(rec.job_id)  # already gone: fine
    assert store.get(rec.job_id) is None
    store.close()


def test_store_lists_newest_first_by_owner_and_status(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.db")
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
    assert store.count_by_status() == {"queued": 5, "processing": 0, "completed": 1, "failed": 0, "cancelled": 0}
    store.close()


def test_store_is_wal_versioned_and_persistent(tmp_path):
    path = tmp_path / "jobs.db"
    store = SQLiteJobStore(path)
    rec = record()
    store.create(rec)
    assert store.journal_mode == "wal"
    assert store.schema_version == 2  # 2: the kind column (avatars)
    store.close()
    with pytest.raises(RuntimeError):
        store.get(rec.job_id)

    reopened = SQLiteJobStore(path)
    assert reopened.get(rec.job_id) == rec
    reopened.close()

    conn = sqlite3.connect(path)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(jobs)")}
    assert {"jobs_status", "jobs_owner_created", "jobs_created", "jobs_expires"} <= indexes
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteJobStore(path)


def test_store_expired_returns_only_finished_jobs_past_their_expiry(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.db")
    now = utcnow()
    old = record(status=JobStatus.completed, expires_at=now - timedelta(seconds=1))
    fresh = record(status=JobStatus.failed, expires_at=now + timedelta(hours=1))
    odd = record(status=JobStatus.processing, expires_at=now - timedelta(seconds=1))  # never swept while active
    for r in (old, fresh, odd):
        store.create(r)
    assert [r.job_id for r in store.expired(now)] == [old.job_id]
    store.close()


def test_store_is_safe_from_many_threads(tmp_path):
    store = SQLiteJobStore(tmp_path / "jobs.db")
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
    store.close()


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
    real_update = manager.store.update

    def counting_update(job_id, **fields):
        if set(fields) == {"stage", "progress"}:
            writes[job_id] += 1
        return real_update(job_id, **fields)

    manager.store.update = counting_update
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


def test_cancel_a_running_job(make_manager, executor):
    manager = make_manager()
    rec = upload(manager, "block.mp4")
    executor.started_event(rec.job_id).wait(5)
    answer = manager.cancel(rec.job_id)
    assert answer.status is JobStatus.processing and answer.stage == "cancelling"
    done = manager.wait(rec.job_id, timeout=5)
    assert done.status is JobStatus.cancelled and done.output_file is None
    assert not manager.files.output_path(rec.job_id).exists()


def test_cancel_a_finished_job_changes_nothing(make_manager):
    manager = make_manager()
    rec = upload(manager)
    done = manager.wait(rec.job_id, timeout=5)
    assert manager.cancel(rec.job_id) == done
    assert manager.output_path(rec.job_id).is_file()


def test_cleanup_removes_files_and_record(make_manager, executor):
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
    assert not manager.files.job_dir(finished.job_id).exists()
    assert not manager.files.job_dir(queued.job_id).exists()
    # the running one: its worker sees the cancel, then its directory goes
    eventually(lambda: not manager.files.job_dir(running.job_id).exists())
    assert queued.job_id not in executor.calls
    assert manager.list() == [] and list(manager.files.root.iterdir()) == []
    later = upload(manager)  # the worker is free again
    assert manager.wait(later.job_id, timeout=5).status is JobStatus.completed


def test_output_path_is_409_until_completed_with_the_file(make_manager, executor):
    manager = make_manager(workers=1)
    blocker = upload(manager, "block.mp4")
    executor.started_event(blocker.job_id).wait(5)
    queued = upload(manager)
    with pytest.raises(JobNotFinishedError, match="queued") as e:
        manager.output_path(queued.job_id)
    assert e.value.http_status == 409
    executor.release.set()
    manager.wait(queued.job_id, timeout=5)
    path = manager.output_path(queued.job_id)
    path.unlink()  # removed behind our back
    with pytest.raises(JobNotFinishedError, match="no longer available"):
        manager.output_path(queued.job_id)


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


def test_admission_refuses_when_the_queue_is_full(make_manager, executor):
    manager = make_manager(workers=1, max_queued=2)
    blocker = upload(manager, "block.mp4")
    executor.started_event(blocker.job_id).wait(5)
    waiting = [upload(manager), upload(manager)]
    with pytest.raises(QueueFullError) as e:
        manager.new_upload()
    assert e.value.http_status == 429 and e.value.retry_after_s >= 1
    assert len(list(manager.files.root.iterdir())) == 3  # nothing created for the refused one

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


def test_concurrent_submits_are_each_processed_exactly_once(make_manager, executor):
    manager = make_manager(workers=3, max_queued=1000)
    submitted, errors = [], []

    def client() -> None:
        try:
            for _ in range(8):
                submitted.append(upload(manager).job_id)
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(submitted)) == 48
    for job_id in submitted:
        assert manager.wait(job_id, timeout=10).status is JobStatus.completed
    assert sorted(executor.calls) == sorted(submitted)  # each exactly once
    assert manager.counts()["completed"] == 48


# -- restarts --------------------------------------------------------------------------------


def test_a_job_interrupted_by_a_crash_is_requeued_and_completes(tmp_path, make_manager, executor):
    data = tmp_path / "data"
    crashed = fake_crash(data, JobStatus.processing, attempts=1)
    manager = make_manager(data, max_attempts=2)
    done = manager.wait(crashed.job_id, timeout=5)
    assert done.status is JobStatus.completed and done.attempts == 2
    assert executor.calls == [crashed.job_id]


def test_a_job_out_of_attempts_fails_with_a_clear_reason(tmp_path, make_manager, executor):
    data = tmp_path / "data"
    crashed = fake_crash(data, JobStatus.processing, attempts=2)
    no_inputs = fake_crash(data, JobStatus.processing, attempts=1, inputs=False)
    manager = make_manager(data, max_attempts=2)
    failed = manager.get(crashed.job_id)
    assert failed.status is JobStatus.failed
    assert failed.error == "the server stopped while the job was running (attempt 2 of 2)"
    assert failed.expires_at is not None
    assert manager.get(no_inputs.job_id).status is JobStatus.failed
    assert "input files" in manager.get(no_inputs.job_id).error
    assert executor.calls == []


def test_queued_jobs_are_requeued_in_creation_order(tmp_path, make_manager, executor):
    data = tmp_path / "data"
    base = utcnow()
    recs = [fake_crash(data, JobStatus.queued, attempts=0, created_at=base + timedelta(seconds=s)) for s in (3, 1, 2)]
    interrupted = fake_crash(data, JobStatus.processing, attempts=1, created_at=base)
    manager = make_manager(data, workers=1)
    for r in (*recs, interrupted):
        assert manager.wait(r.job_id, timeout=5).status is JobStatus.completed
    assert executor.calls == [interrupted.job_id, recs[1].job_id, recs[2].job_id, recs[0].job_id]


def test_finished_jobs_survive_a_restart_and_orphans_do_not(tmp_path, make_manager, executor):
    data = tmp_path / "data"
    first = make_manager(data)
    done = upload(first)
    first.wait(done.job_id, timeout=5)
    failed = upload(first, "fail.mp4")
    first.wait(failed.job_id, timeout=5)
    first.close()

    orphan = JobFiles(data).job_dir(new_job_id(), create=True)  # a dir whose record never got written
    (orphan / "video.mp4").write_bytes(b"video")
    leftover = JobFiles(data).job_dir(done.job_id) / f".{OUTPUT_NAME}.abcdef012345.part"
    leftover.write_bytes(b"half a video")

    second = make_manager(data, orphan_grace_s=3600)  # recovery ignores the grace: nothing runs yet
    assert second.get(done.job_id).status is JobStatus.completed
    assert second.output_path(done.job_id).read_bytes() == b"result of " + done.job_id.encode()
    assert second.get(failed.job_id).error == "face.mp4 has no video stream"
    assert not orphan.exists() and not leftover.exists()
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


def test_one_manager_per_data_directory(tmp_path, make_manager):
    make_manager(tmp_path / "data")
    with pytest.raises(RuntimeError, match="already using"):
        make_manager(tmp_path / "data")


# -- expiry ----------------------------------------------------------------------------------


def test_sweep_removes_expired_jobs_and_orphans(make_manager, executor):
    manager = make_manager(retention_s=60, workers=1)
    old = upload(manager)
    manager.wait(old.job_id, timeout=5)
    running = upload(manager, "block.mp4")
    executor.started_event(running.job_id).wait(5)
    orphan = manager.files.job_dir(new_job_id(), create=True)
    upload_id, upload_dir = manager.new_upload()  # an upload in progress is not an orphan

    assert manager.sweep() == 1  # not expired yet: only the orphan
    assert manager.get(old.job_id) and not orphan.exists() and upload_dir.exists()

    assert manager.sweep(now=utcnow() + timedelta(seconds=61)) == 1
    with pytest.raises(JobNotFoundError):
        manager.get(old.job_id)
    assert not manager.files.job_dir(old.job_id).exists()
    assert manager.get(running.job_id).status is JobStatus.processing  # running jobs never expire
    assert manager.files.job_dir(running.job_id).exists() and upload_dir.exists()


def test_the_background_sweeper_runs_by_itself(make_manager):
    manager = make_manager(retention_s=0, sweep_interval_s=0.05)
    rec = upload(manager)
    eventually(lambda: manager.store.get(rec.job_id) is None)
    eventually(lambda: not manager.files.job_dir(rec.job_id).exists())
