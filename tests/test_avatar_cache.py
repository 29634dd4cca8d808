"""Prepare once, dub many: a video seen before skips face tracking and VAE encoding,
and produces exactly the frames a cold run produces."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lipsync_runner.pipeline.avatar_cache import AvatarCache, AvatarParams, owner_key
from lipsync_runner.faces import FaceTrack, HaarFaceDetector
from lipsync_runner.media.ffmpeg import VideoReader
from lipsync_runner.models.musetalk import MuseTalk
from lipsync_runner.pipeline.job import PipelineOptions, run


def frames_of(path: Path) -> np.ndarray:
    with VideoReader(path) as reader:
        return np.stack(list(reader))


class CountingModel:
    """The tiny MuseTalk, counting the frames that go through the VAE encoder."""

    def __init__(self, model: MuseTalk) -> None:
        self.model, self.prepared, self._lock = model, 0, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def prepare(self, crops):
        with self._lock:
            self.prepared += len(crops)
        return self.model.prepare(crops)


@pytest.fixture
def detector():
    return HaarFaceDetector()


def test_a_warm_run_skips_faces_and_prepare_and_gives_the_same_frames(model, detector, media_dir, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    counting = CountingModel(model)
    args = (detector, media_dir / "face.mp4", media_dir / "speech_long.wav")
    cold = run(counting, *args, tmp_path / "cold.mp4", PipelineOptions(batch_size=8), cache=cache)
    assert cold.cache_hit is False and counting.prepared == 50  # each source frame once, ping-pong included
    warm = run(counting, *args, tmp_path / "warm.mp4", PipelineOptions(batch_size=8), cache=cache)
    assert warm.cache_hit is True and counting.prepared == 50  # nothing new went through the encoder
    assert "faces" not in warm.seconds and warm.seconds.get("prepare", 0) < 0.5
    np.testing.assert_array_equal(frames_of(warm.output), frames_of(cold.output))
    uncached = run(model, *args, tmp_path / "plain.mp4", PipelineOptions(batch_size=8))
    diff = np.abs(frames_of(uncached.output).astype(int) - frames_of(cold.output).astype(int))
    assert diff.mean() < 0.5  # the same computation; at most float rounding apart


def test_the_cache_survives_a_restart(model, detector, media_dir, tmp_path):
    args = (model, detector, media_dir / "face.mp4", media_dir / "speech_short.wav")
    assert run(*args, tmp_path / "a.mp4", cache=AvatarCache(tmp_path / "c")).cache_hit is False
    assert run(*args, tmp_path / "b.mp4", cache=AvatarCache(tmp_path / "c")).cache_hit is True


def test_concurrent_jobs_on_one_video_share_one_preparation(model, detector, media_dir, tmp_path):
    cache = AvatarCache(tmp_path / "cache")
    counting = CountingModel(model)
    results = []

    def job(i: int) -> None:
        results.append(run(counting, detector, media_dir / "face.mp4", media_dir / "speech_short.wav",
                           tmp_path / f"o{i}.mp4", PipelineOptions(batch_size=8), cache=cache))

    threads = [threading.Thread(target=job, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and cache.builds == 1  # one face track for the three jobs
    assert sorted(r.cache_hit for r in results) == [False, True, True]
    assert counting.prepared == 30  # 1.2 s at 25 fps: every frame encoded exactly once


def test_any_parameter_or_model_change_makes_a_new_entry():
    base = AvatarParams(bbox_shift=0, version="v15", extra_margin=10, detector="haar", detect_every=2,
                        weights_id="abc")
    key = base.key("videohash")
    variants = [AvatarParams(**{**base.__dict__, field: value}) for field, value in
                [("bbox_shift", 5), ("version", "v1"), ("extra_margin", 12), ("detector", "fan"),
                 ("detect_every", 1), ("weights_id", "abd")]]
    assert len({key, *(v.key("videohash") for v in variants)}) == 7
    assert base.key("othervideo") != key


def test_new_model_files_invalidate_the_cache(models_dir, tmp_path):
    import shutil

    copy = Path(shutil.copytree(models_dir, tmp_path / "models"))
    before = MuseTalk.from_pretrained(copy, device="cpu").weights_id
    unet = copy / "musetalkV15" / "unet.pth"
    os.utime(unet, ns=(unet.stat().st_atime_ns, unet.stat().st_mtime_ns + 10**9))  # a new download
    assert MuseTalk.from_pretrained(copy, device="cpu").weights_id != before


def test_least_recently_used_entries_are_evicted_past_the_bound(tmp_path):
    cache = AvatarCache(tmp_path / "c", max_bytes=10**9)
    track = FaceTrack(boxes=np.zeros((100, 4), np.int32), landmarks=None, has_face=np.ones(100, bool),
                      detector="haar")
    for key in ("old", "mid", "new"):
        with cache.open(key, lambda: track):
            pass
        os.utime(tmp_path / "c" / key / "last_used", (1000 + len(key), 1000 + len(os.listdir(tmp_path / "c"))))
    entry = cache.size_bytes() // 3
    cache.max_bytes = 2 * entry + entry // 2
    with cache.open("new", lambda: track):  # in use: never evicted, and now the most recent
        assert cache.evict() == ["old"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.is_dir()) == ["mid", "new"]


# ------------------------------------------------------------------ tenants, retention, crashes


def _track(n: int = 20) -> FaceTrack:
    return FaceTrack(boxes=np.zeros((n, 4), np.int32), landmarks=None, has_face=np.ones(n, bool), detector="haar")


def _hit(view, key: str = "video-key") -> bool:
    with view.open(key, _track) as (_, hit):
        return hit


def test_an_owner_never_hits_another_owners_entry(tmp_path):
    """Latents decode back to faces and a hit says "seen before": entries belong to their owner."""
    cache = AvatarCache(tmp_path / "c")
    assert _hit(cache.for_job("a1", "owner-a")) is False
    assert _hit(cache.for_job("b1", "owner-b")) is False  # same video, another tenant: its own entry
    assert _hit(cache.for_job("a2", "owner-a")) is True
    assert _hit(cache.for_job("x1", None)) is False  # unscoped deployments share one entry per video
    assert _hit(cache.for_job("x2", None)) is True
    assert cache.builds == 3


def test_an_entry_goes_with_the_last_job_that_used_it(tmp_path):
    cache = AvatarCache(tmp_path / "c")
    _hit(cache.for_job("j1", "owner-a"))
    _hit(cache.for_job("j2", "owner-a"))
    assert cache.release_job("j1") == []  # j2 still uses it
    assert _hit(cache.for_job("j3", "owner-a")) is True
    assert cache.release_job("j2") == [] and len(cache.release_job("j3")) == 1
    assert [p for p in (tmp_path / "c").iterdir() if p.is_dir()] == []
    assert _hit(cache.for_job("j4", "owner-a")) is False


def test_a_job_cleanup_releases_its_avatar_entries(tmp_path):
    from lipsync_runner.jobs import JobManager, JobOutcome, JobParams

    released = []
    manager = JobManager.from_data_dir(tmp_path / "data", lambda ctx: JobOutcome("x", 0), on_removed=released.append)
    job_id, job_dir = manager.new_upload()
    for name in ("v.mp4", "a.wav"):
        (job_dir / name).write_bytes(b"x")
    manager.submit(job_id, video_file="v.mp4", audio_file="a.wav", video_filename="v.mp4", audio_filename="a.wav",
                   params=JobParams())
    manager.cleanup(job_id)
    assert released == [job_id]
    manager.close()


def test_jobs_removed_on_another_replica_release_their_entries_here(tmp_path):
    cache = AvatarCache(tmp_path / "c")
    _hit(cache.for_job("gone", "o"), "k-gone")
    _hit(cache.for_job("kept", "o"), "k-kept")
    _hit(cache.for_job("gone2", "o"), "k-kept")  # shared with a job that still exists
    assert cache.release_missing(lambda job_id: job_id == "kept") == [owner_key("k-gone", "o")]
    assert _hit(cache.for_job("again", "o"), "k-kept") is True


def test_entries_expire_with_the_retention_time_but_never_while_in_use(tmp_path):
    cache = AvatarCache(tmp_path / "c")
    _hit(cache.for_job("old", "o"), "k-old")
    _hit(cache.for_job("new", "o"), "k-new")
    now = time.time()

    def age(key: str, seconds: float) -> None:
        os.utime(tmp_path / "c" / owner_key(key, "o") / "last_used", (now - seconds, now - seconds))

    age("k-new", 10)
    with cache.for_job("busy", "o").open("k-old", _track):
        age("k-old", 7200)
        assert cache.expire(3600, now=now) == []  # in use: stays, however old
    age("k-old", 7200)
    assert cache.expire(3600, now=now) == [owner_key("k-old", "o")]
    assert _hit(cache.for_job("again", "o"), "k-new") is True


def test_builds_a_crash_left_behind_are_counted_and_reclaimed(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    dead = root / "abc.tmp999999"  # no such process
    dead.mkdir()
    (dead / "latents.f32").write_bytes(b"\0" * 10_000)
    alive = root / f"def.tmp{os.getpid()}"  # a build in progress in a live process
    alive.mkdir()
    cache = AvatarCache(root)  # a restart
    assert not dead.exists() and alive.exists()
    (alive / "latents.f32").write_bytes(b"\0" * 5000)
    assert cache.size_bytes() >= 5000  # a build in progress counts towards the bound


def test_an_entry_in_use_by_another_process_is_never_removed(tmp_path):
    """Eviction in one process cannot pull an entry from under a job in another one."""
    import subprocess
    import sys

    root = tmp_path / "c"
    AvatarCache(root)
    with AvatarCache(root).open("shared", _track):
        pass
    go = tmp_path / "go"
    code = (f"import time, pathlib; from lipsync_runner.pipeline.avatar_cache import AvatarCache\n"
            f"from tests.test_avatar_cache import _track\n"
            f"with AvatarCache({str(root)!r}).open('shared', _track):\n"
            f"    pathlib.Path({str(tmp_path / 'opened')!r}).touch()\n"
            f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "opened").exists():
            assert other.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        cache = AvatarCache(root, max_bytes=0)
        assert cache.evict() == [] and cache.remove("shared") is False
        assert (root / "shared" / "meta.json").is_file()
        go.touch()
        assert other.wait(timeout=60) == 0
        assert cache.remove("shared") is True and not (root / "shared").exists()
    finally:
        other.kill()
