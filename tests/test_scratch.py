"""Spec for lipsync_runner.pipeline.scratch_disk: a job's scratch estimate, the admission check, reservations.

Free space is faked (a ledger takes its `disk_usage`), so a 507 needs no full disk; the
inputs are real probed files. The last tests run jobs in-process through ServiceCore, as
tests/test_faults.py does, to show a reservation is held while a job runs and released
however it ends.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

from lipsync_runner.config import ApiLimits
from lipsync_runner.inputs.validation import validate_media
from lipsync_runner.errors import InputTooLargeError, InsufficientStorageError, JobCancelledError
from lipsync_runner.jobs import JobParams
from lipsync_runner.media.ffmpeg import AudioInfo, VideoInfo
from lipsync_runner.pipeline.scratch_disk import ScratchLedger, check_admissible, directory_bytes, estimate

from .concurrency import raised, run_together
from .hostile_media import ffmpeg, mp4_with_sample_durations


def video(width: int = 1920, height: int = 1080, fps: Fraction = Fraction(30), seconds: float = 600) -> VideoInfo:
    return VideoInfo(width=width, height=height, fps=fps, duration=seconds, frame_count_estimate=round(seconds * fps),
                     codec="h264", has_audio=True, rotation=0, demuxer="mov", packet_count=round(seconds * fps))


def audio(seconds: float) -> AudioInfo:
    return AudioInfo(duration=seconds, sample_rate=48000, channels=2, codec="aac", demuxer="mov")


def fake_disk(free: int):
    """A disk_usage whose free space is whatever `state.free` says."""
    state = SimpleNamespace(free=free)
    return state, lambda path: SimpleNamespace(total=10 * free, used=0, free=state.free)


# --------------------------------------------------------------------------- the estimate


def test_ten_minutes_of_1080p_with_longer_audio_needs_about_112_gb_of_frames() -> None:
    need = estimate(video(), audio(610))  # bounce (the default) plays the video back: the store at any size
    assert need.random_access
    assert need.stored_frames == 18_001  # every source frame (one of slack), kept raw
    assert need.frame_store_bytes == 18_001 * 1920 * 1080 * 3  # 112.0 GB
    assert need.output_frames == 18_300 and need.sound_bytes == 0  # the audio is muxed as it is
    assert 1e9 < need.output_bytes < 3e9  # 18,300 H.264 frames at crf 18, generously
    assert need.total == need.frame_store_bytes + need.output_bytes


def test_a_forward_plan_stores_frames_only_while_they_fit_the_spool_bound() -> None:
    assert estimate(video(), audio(590)).frame_store_bytes == 0  # 110 GB > 20 GiB: decoded twice instead
    small = estimate(video(320, 240, Fraction(25), 2), audio(1))  # cold: the frames decoded to track are kept
    assert small.frame_store_bytes == 51 * 320 * 240 * 3 and not small.random_access
    assert estimate(video(320, 240, Fraction(25), 2), audio(1), max_spool_bytes=0).frame_store_bytes == 0
    cut = estimate(video(seconds=10), audio(20), JobParams(sync_mode="cut_off"), max_spool_bytes=0)
    assert cut.frame_store_bytes == 0 and cut.output_frames == 300  # cut_off never goes back
    assert cut.sound_bytes > 0  # the sound track is laid out anew (cut to the video)


# --------------------------------------------------------------------------- admission


def test_a_job_over_the_per_job_cap_is_413_at_admission(media_dir: Path) -> None:
    """2 s of 320x240 at 25 fps with 3.3 s of speech: 51 raw frames (11.8 MB) plus the output."""
    face, speech = media_dir / "face.mp4", media_dir / "speech_long.wav"
    with pytest.raises(InputTooLargeError, match=r"about 1\d MB of scratch disk \(51 raw 320x240 frames kept on "
                                                 r"disk for the ping-pong loop plus the output\), over the per-job "
                                                 r"limit of 10 MB") as exc:
        validate_media(face, speech, ApiLimits(max_job_scratch_gb=0.01))
    assert exc.value.http_status == 413
    video_info, audio_info = validate_media(face, speech, ApiLimits(max_job_scratch_gb=0.02))
    assert check_admissible(video_info, audio_info, ApiLimits(max_job_scratch_gb=0)) == \
        estimate(video_info, audio_info).total  # 0: no cap


def test_a_job_that_does_not_fit_the_free_space_is_507_at_admission(media_dir: Path, tmp_path: Path) -> None:
    face, speech = media_dir / "face.mp4", media_dir / "speech_long.wav"
    limits = ApiLimits()
    probes = validate_media(face, speech, limits)
    need = check_admissible(*probes, limits)
    floor = 10**9
    disk, usage = fake_disk(floor + need)
    ledger = ScratchLedger(tmp_path, floor_bytes=floor, disk_usage=usage)
    check_admissible(*probes, limits, ledger)  # exactly fits
    disk.free -= 1
    with pytest.raises(InsufficientStorageError, match=r"needs about 1\d MB of scratch space and 1\d MB is available") \
            as exc:
        validate_media(face, speech, limits, ledger)  # what both generate routes call
    assert exc.value.http_status == 507
    disk.free += 10**6
    check_admissible(*probes, limits, ledger)
    with ledger.reserve(10**6):  # what running jobs hold counts as taken
        with pytest.raises(InsufficientStorageError):
            check_admissible(*probes, limits, ledger)
    check_admissible(*probes, limits, ledger)


# --------------------------------------------------------------------------- the ledger


def test_concurrent_reservations_never_oversubscribe() -> None:
    _, usage = fake_disk(1000)
    ledger = ScratchLedger(".", floor_bytes=100, disk_usage=usage)
    lock = threading.Lock()
    held = peak = granted = refused = 0

    def worker(seed: int) -> None:
        nonlocal held, peak, granted, refused
        rng = random.Random(seed)
        for _ in range(300):
            size = rng.randint(50, 400)
            try:
                reservation = ledger.reserve(size)
            except InsufficientStorageError:
                with lock:
                    refused += 1
                continue
            with lock:
                held += size
                peak = max(peak, held)
                granted += 1
            time.sleep(rng.random() / 2000)
            with lock:
                held -= size
            reservation.release()
            reservation.release()  # idempotent

    assert raised(run_together(worker, 8)) == []
    assert peak <= 900  # free minus the floor, never more
    assert granted > 100 and refused > 100  # the ledger was full often, and emptied often
    assert ledger.reserved_bytes == 0 and ledger.available() == 900


def test_what_a_job_writes_inside_its_reservation_is_not_counted_twice(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "input_video.mp4").write_bytes(b"v" * 100_000)  # inputs are there before: not scratch
    capacity = 50 * 2**20
    ledger = ScratchLedger(tmp_path, disk_usage=lambda p: SimpleNamespace(free=capacity - directory_bytes(job_dir)))
    before = ledger.available()
    with ledger.reserve(8 * 2**20, directory=job_dir) as reservation:
        assert ledger.available() == before - 8 * 2**20
        (job_dir / "frames.rgb").write_bytes(b"\0" * 6 * 2**20)  # the free space drops by 6 MiB ...
        assert reservation.used() == 6 * 2**20
        assert ledger.available() == before - 8 * 2**20  # ... and the reservation's unused part with it
        reservation.check()
        assert reservation.nbytes == 8 * 2**20
        (job_dir / "output.part").write_bytes(b"\0" * 4 * 2**20)  # 10 MiB written: past the reservation
        reservation.check()  # grows it while the disk has room
        assert 10 * 2**20 < reservation.nbytes <= capacity
        (job_dir / "more.part").write_bytes(b"\0" * 45 * 2**20)  # 55 MiB: more than the disk had
        with pytest.raises(InsufficientStorageError, match="more than the .* reserved for it"):
            reservation.check()
    assert ledger.reserved_bytes == 0


def test_a_reservation_that_does_not_fit_waits_for_a_running_one_then_starts(tmp_path: Path) -> None:
    _, usage = fake_disk(1000)
    ledger = ScratchLedger(tmp_path, disk_usage=usage)
    first = ledger.reserve(800)
    with pytest.raises(InsufficientStorageError, match="to start the job"):
        ledger.reserve(500)  # no waiting asked for
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(ledger.reserve(500, wait_s=30)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not got  # waiting, not refused
    first.release()
    waiter.join(10)
    assert len(got) == 1 and ledger.reserved_bytes == 500
    got[0].release()
    with pytest.raises(InsufficientStorageError):
        ledger.reserve(1001, wait_s=30)  # nothing to wait for: it can never fit
    cancelled = threading.Event()
    blocker = ledger.reserve(800)
    cancelled.set()
    with pytest.raises(JobCancelledError):
        ledger.reserve(500, wait_s=30, should_cancel=cancelled.is_set)
    blocker.release()


# --------------------------------------------------------------------------- jobs in the service core


@pytest.fixture
def core(tmp_path, models_dir, model):
    from lipsync_runner.serving.core import ServiceCore
    from lipsync_runner.config import Settings
    from lipsync_runner.serving.runner import RunnerCore
    from lipsync_runner.config import ServiceSettings
    from lipsync_runner.config import RunnerSettings

    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.model, runner.state = model, "ready"
    api = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=tmp_path / "data", job_workers=1, free_space_floor_mb=0, chunk_frames=4,
                                avatar_cache=False),
        runner=RunnerSettings(device="cpu", models_dir=models_dir), limits=ApiLimits(max_audio_seconds=20)))
    api.start(None)
    reservations = []
    reserve = api.scratch.reserve
    api.scratch.reserve = lambda *a, **k: reservations.append(reserve(*a, **k)) or reservations[-1]
    api.reservations = reservations
    yield api
    api.stop()


def submit(core, video: Path, audio: Path):
    job_id, job_dir = core.manager.new_upload()
    (job_dir / f"input_video{video.suffix}").write_bytes(video.read_bytes())
    (job_dir / f"input_audio{audio.suffix}").write_bytes(audio.read_bytes())
    return core.manager.submit(job_id, video_file=f"input_video{video.suffix}", audio_file=f"input_audio{audio.suffix}",
                               video_filename=video.name, audio_filename=audio.name, params=JobParams())


def test_a_job_holds_its_reservation_while_it_runs_and_releases_it_when_it_fails(core, media_dir, tmp_path):
    """Audio that declares 0.9 s but decodes to 60 s: admitted, then stopped at the 20 s limit."""
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:r=8000:d=60", "-c:a", "aac", "-b:a", "12k", "-use_editlist", "0",
           tmp_path / "speech60.m4a")
    lying = mp4_with_sample_durations(tmp_path / "speech60.m4a", tmp_path / "speech.m4a", delta=16)
    job = core.manager.wait(submit(core, media_dir / "face.mp4", lying).job_id, timeout=120)
    assert job.status == "failed" and "its audio decodes to more than the limit of 20 s" in job.error, job
    (reservation,) = core.reservations
    assert reservation.nbytes > 0 and reservation.released
    assert core.scratch.reserved_bytes == 0


def test_a_cancelled_job_releases_its_reservation(core, media_dir):
    job = submit(core, media_dir / "face.mp4", media_dir / "speech_long.wav")  # ping-pong: a frame store
    deadline = time.monotonic() + 120
    while not core.reservations:  # reserved just before the pipeline starts
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (reservation,) = core.reservations
    assert not reservation.released and core.scratch.reserved_bytes > 0  # held while it runs
    assert reservation.nbytes == check_admissible(*validate_media(media_dir / "face.mp4",
                                                                  media_dir / "speech_long.wav", ApiLimits()),
                                                  ApiLimits())
    core.manager.cancel(job.job_id)
    assert core.manager.wait(job.job_id, timeout=120).status == "cancelled"
    assert reservation.released and core.scratch.reserved_bytes == 0


def test_the_admission_path_refuses_a_job_the_disk_cannot_hold_with_507_and_keeps_nothing(core, media_dir):
    """Both surfaces admit through core.operations.admission (REST streams into it, BentoML's
    generate is routed to REST); its files entry is the same path after the upload."""
    _, usage = fake_disk(5 * 10**6)  # 5 MB free: the job needs about 16 MB
    core.scratch._disk_usage = usage
    with pytest.raises(InsufficientStorageError, match="not enough disk space for this job") as exc:
        asyncio.run(core.operations.admission.admit_files(media_dir / "face.mp4", media_dir / "speech_long.wav",
                                                          {}, owner=None))
    assert exc.value.http_status == 507
    assert list(core.files.root.iterdir()) == []
