"""Fairness between tenants (issue 24 item 6): one owner filling the queue or the avatar cache turns
only that owner away, and free workers take turns between owners instead of first come first served.

The store tests run against both stores (SQLite, and PostgreSQL as replicas share it); each test
builds its own queue. An owner is a token's fingerprint when jobs are scoped per token; None (jobs
not scoped) is one owner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lipsync_runner.config import ServiceSettings
from lipsync_runner.errors import InsufficientStorageError, QueueFullError
from lipsync_runner.faces import FaceTrack
from lipsync_runner.jobs import (
    OUTPUT_NAME,
    JobContext,
    JobFiles,
    JobManager,
    JobOutcome,
    JobParams,
    JobRecord,
    JobStatus,
    JobStore,
    SQLiteJobStore,
    new_job_id,
)
from lipsync_runner.pipeline.avatar_cache import AvatarCache
from lipsync_runner.storage import LocalStorage

MakeStore = Callable[[], JobStore]


@pytest.fixture(params=["sqlite", "postgres"])
def make_store(request, tmp_path: Path) -> Iterator[MakeStore]:
    """Stores over one queue: each call is another replica's view of it (PostgreSQL: its own pool)."""
    made: list[JobStore] = []
    if request.param == "postgres":
        from lipsync_runner.jobs.postgres import PostgresJobStore

        url = request.getfixturevalue("postgres").create_database()  # an empty queue, no turns taken yet

        def make() -> JobStore:
            made.append(PostgresJobStore(url))
            return made[-1]
    else:
        sqlite = SQLiteJobStore(tmp_path / "jobs.sqlite3")  # one process owns it: every view is this one

        def make() -> JobStore:
            if not made:
                made.append(sqlite)
            return sqlite
    yield make
    for store in made:
        store.close()


def record(owner: str | None) -> JobRecord:
    return JobRecord(job_id=new_job_id(), owner=owner, video_filename="v.mp4", audio_filename="a.wav",
                     video_file="video.mp4", audio_file="audio.wav")


def queue(store: JobStore, owner: str | None, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        rec = record(owner)
        store.create(rec)
        ids.append(rec.job_id)
    return ids


def finish(store: JobStore, job_id: str) -> None:
    store.update(job_id, status=JobStatus.completed, lease_expires_at=None)


# -- (a) admission: each owner's share of the queue ------------------------------------------


class Recorder:
    """An executor that only records the order it runs jobs in."""

    def __init__(self) -> None:
        self.order: list[str] = []

    def __call__(self, ctx: JobContext) -> JobOutcome:
        self.order.append(ctx.job.job_id)
        ctx.output_path.write_bytes(b"out")
        return JobOutcome(output_file=OUTPUT_NAME, frames=1, timings={})


def manager(make_store: MakeStore, data: Path, **kwargs) -> JobManager:
    files = JobFiles(data)
    return JobManager(make_store(), files, kwargs.pop("execute", Recorder()), storage=LocalStorage(files), **kwargs)


def submit(m: JobManager, owner: str | None) -> JobRecord:
    job_id, directory = m.new_upload(owner)
    (directory / "video.mp4").write_bytes(b"video")
    (directory / "audio.wav").write_bytes(b"audio")
    return m.submit(job_id, video_file="video.mp4", audio_file="audio.wav", video_filename="v.mp4",
                    audio_filename="a.wav", params=JobParams(), owner=owner)


def test_an_owner_at_its_queue_limit_gets_429_naming_its_limit_and_others_are_admitted(make_store, tmp_path):
    m = manager(make_store, tmp_path / "data", max_queued=4, max_queued_per_owner=2)  # not started: jobs wait
    try:
        submit(m, "alice")
        alices_upload, _ = m.new_upload("alice")  # an upload in progress counts as waiting, as for the global limit
        with pytest.raises(QueueFullError) as refused:
            m.new_upload("alice")
        message = str(refused.value)
        assert refused.value.http_status == 429 and refused.value.retry_after_s >= 1
        assert "your jobs" in message and "(2, LIP_SYNC_MAX_QUEUED_JOBS_PER_OWNER)" in message, message
        assert len(m.store.uploads()) == 1  # the refused one holds no slot

        assert submit(m, "bob").status is JobStatus.queued  # another owner is still admitted
        m.discard_upload(alices_upload)
        submit(m, "alice")  # a slot of alice's own is free again
        assert submit(m, None).owner is None  # None (jobs not scoped) is an owner too, with its own share
        with pytest.raises(QueueFullError) as busy:  # 4 waiting: the global limit stays the last guard
            m.new_upload("carol")
        assert "server is busy (4 jobs waiting)" in str(busy.value)
    finally:
        m.close()


def test_the_owner_none_is_one_owner_and_an_unsaid_owner_meets_only_the_global_limit(make_store, tmp_path):
    m = manager(make_store, tmp_path / "data", max_queued=5, max_queued_per_owner=2)
    try:
        submit(m, None)
        submit(m, None)
        with pytest.raises(QueueFullError, match="your jobs"):
            m.new_upload(None)
        m.new_upload()  # a caller that does not say whose upload it is: only the global limit
    finally:
        m.close()


# -- (b) claims: owners take turns -----------------------------------------------------------


def test_with_one_worker_the_second_owner_is_served_second_not_sixth(make_store):
    store = make_store()
    alices = queue(store, "alice", 5)
    bobs = queue(store, "bob", 1)  # after all of alice's
    order = []
    while (rec := store.claim("the-one-worker", lease_s=30)) is not None:
        order.append(rec.job_id)
        finish(store, rec.job_id)  # one worker: each job ends before the next claim
    assert order == [alices[0], bobs[0], *alices[1:]]


def test_a_one_worker_manager_runs_jobs_in_turns(make_store, tmp_path):
    recorder = Recorder()
    m = manager(make_store, tmp_path / "data", workers=1, execute=recorder)
    try:
        alices = [submit(m, "alice").job_id for _ in range(5)]
        bobs = [submit(m, "bob").job_id]
        m.start()
        for job_id in alices + bobs:
            assert m.wait(job_id, timeout=10).status is JobStatus.completed
        assert recorder.order == [alices[0], bobs[0], *alices[1:]]
    finally:
        m.close()


def test_the_owner_with_fewer_jobs_running_goes_first(make_store):
    store = make_store()
    alices = queue(store, "alice", 3)
    assert [store.claim("w", lease_s=30).job_id for _ in range(2)] == alices[:2]  # alone: alice runs two
    bobs = queue(store, "bob", 2)
    assert store.claim("w", lease_s=30).job_id == bobs[0]
    finish(store, bobs[0])  # bob was served last, but runs none while alice runs two
    assert store.claim("w", lease_s=30).job_id == bobs[1]
    assert store.claim("w", lease_s=30).job_id == alices[2]


def test_an_owner_at_its_running_cap_waits_even_across_replicas(make_store):
    stores = [make_store() for _ in range(3)]
    alices = queue(stores[0], "alice", 6)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(store: JobStore) -> None:
        rec = store.claim(f"w-{threading.get_ident()}", lease_s=30, max_running_per_owner=2)
        if rec is not None:
            with lock:
                claimed.append(rec.job_id)

    threads = [threading.Thread(target=worker, args=(stores[i % 3],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(alices[:2])  # six claims at once, two of alice's jobs: the cap holds
    bobs = queue(stores[1], "bob", 1)
    assert stores[2].claim("w", lease_s=30, max_running_per_owner=2).job_id == bobs[0]
    finish(stores[0], claimed[0])
    assert stores[1].claim("w", lease_s=30, max_running_per_owner=2).job_id == alices[2]


# -- (c) the avatar cache: each owner's share of the avatars' room ---------------------------


def track() -> FaceTrack:
    return FaceTrack(boxes=np.zeros((20, 4), np.int32), landmarks=None, has_face=np.ones(20, bool), detector="haar")


def avatar(cache: AvatarCache, owner: str | None, video: str) -> None:
    with cache.for_job(new_job_id(), owner, pin=True).open(video, track):
        pass


def test_an_owner_whose_avatars_fill_its_share_is_refused_and_others_still_fit(tmp_path):
    cache = AvatarCache(tmp_path / "cache", max_bytes=10**9)
    avatar(cache, "alice", "video-1")
    cache.max_owner_bytes = cache.owners_pinned_bytes("alice")  # alice's one avatar fills her share
    entries = {p.name for p in cache.root.iterdir() if p.is_dir()}
    builds = cache.builds

    with pytest.raises(InsufficientStorageError) as refused:
        avatar(cache, "alice", "video-2")
    assert refused.value.http_status == 507
    assert "your avatars already fill your share" in str(refused.value)
    assert "LIP_SYNC_AVATAR_CACHE_GB_PER_OWNER" in str(refused.value)
    assert cache.builds == builds and {p.name for p in cache.root.iterdir() if p.is_dir()} == entries  # no build
    with pytest.raises(InsufficientStorageError):
        cache.check_room_for_avatar("alice")  # what admission asks before reading an upload

    cache.check_room_for_avatar("bob")
    avatar(cache, "bob", "video-2")  # another owner's avatar fits
    avatar(cache, None, "video-2")  # and so does the unscoped deployment's (owner None: the whole cache)
    entries = {p.name for p in cache.root.iterdir() if p.is_dir()}
    avatar(cache, "alice", "video-1")  # a second avatar of alice's stored video pins no new entry: not refused
    assert {p.name for p in cache.root.iterdir() if p.is_dir()} == entries


def test_the_service_defaults_give_each_owner_a_fifth():
    s = ServiceSettings(max_queued_jobs=100, avatar_cache_gb=20.0)
    assert s.queued_jobs_per_owner == 20 and s.avatar_cache_bytes_per_owner == 4 * 2**30
    assert ServiceSettings(max_queued_jobs=3).queued_jobs_per_owner == 1
    assert ServiceSettings(max_queued_jobs_per_owner=7, avatar_cache_gb_per_owner=1.0).queued_jobs_per_owner == 7


def test_queue_positions_follow_the_turns_the_store_takes(make_store):
    """The queue position a status shows (jobs/eta.py) replays the store's turns, not first come first served."""
    from lipsync_runner.jobs.eta import claim_order

    store = make_store()
    queue(store, "alice", 3)
    queue(store, "bob", 2)
    queue(store, None, 1)
    running = store.claim("w", lease_s=30)  # alice's first runs
    replayed = [r.job_id for r in claim_order(store.list(statuses={JobStatus.queued}, limit=None),
                                              store.list(statuses={JobStatus.processing}, limit=None))]
    taken = []
    while (rec := store.claim("w", lease_s=30)) is not None:  # several workers: nothing finishes meanwhile
        taken.append(rec.job_id)
    assert replayed == taken and running.owner == "alice"
