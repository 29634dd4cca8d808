"""Faults inside the service: the GPU runs out of memory, the disk fills up, ffmpeg hangs.
Each must end in a clean, explained outcome, never a stuck job or a corrupted result.

The service core runs in-process here (runner and API in one process, as in BentoML's
development mode), with the tiny models, so faults can be injected precisely."""

from __future__ import annotations

import hashlib
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lipsync_runner.errors import InsufficientStorageError, LipSyncError
from lipsync_runner.jobs import JobParams
from lipsync_runner.models.musetalk import MuseTalk
from lipsync_runner.serving.core import ServiceCore
from lipsync_runner.config import Settings
from lipsync_runner.serving.packing import pack_generate
from lipsync_runner.serving.runner import RunnerCore
from lipsync_runner.config import ServiceSettings
from lipsync_runner.config import RunnerSettings


class OomAbove:
    """A MuseTalk whose generate runs out of GPU memory above `limit` frames per call."""

    def __init__(self, model: MuseTalk, limit: int) -> None:
        self.model, self.limit, self.calls = model, limit, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, latents, windows):
        self.calls.append(len(latents))
        if len(latents) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model.generate(latents, windows)


def runner_with(model) -> RunnerCore:
    core = RunnerCore(RunnerSettings(device="cpu"), load=False)
    core.model, core.state = model, "ready"
    return core


def test_an_out_of_memory_batch_is_retried_in_halves_with_the_same_result(model):
    rng = np.random.default_rng(0)
    latents = model.prepare(rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8))
    windows = rng.normal(size=(8, 50, 384)).astype(np.float32)
    flaky = OomAbove(model, limit=3)
    core = runner_with(flaky)
    out = core.generate(pack_generate(latents, windows))
    np.testing.assert_allclose(out.astype(int), model.generate(latents, windows).astype(int), atol=1)
    assert [c for c in flaky.calls if c > 3] == [8, 4] and core.stats.oom_splits == 2
    # the next batch goes straight to the size that fit, without failing first
    flaky.calls.clear()
    core.generate(pack_generate(latents, windows))
    assert flaky.calls == [2, 2, 2, 2]


def test_out_of_memory_on_one_frame_fails_the_call_with_a_clear_error(model):
    core = runner_with(OomAbove(model, limit=0))
    latents = np.zeros((2, 8, 32, 32), np.float32)
    with pytest.raises(LipSyncError, match="ran out of memory on a single frame"):
        core.generate(pack_generate(latents, np.zeros((2, 50, 384), np.float32)))


@pytest.fixture
def service(tmp_path, models_dir, model):
    """ServiceCore with a direct (in-process) runner; the caller picks the model wrapper."""
    created = []

    def make(runner_model=model, **settings) -> ServiceCore:
        defaults = dict(data_dir=tmp_path / "data", job_workers=2, free_space_floor_mb=0, chunk_frames=4)
        core = ServiceCore(runner_with(runner_model), Settings(
            service=ServiceSettings(**{**defaults, **settings}),
            runner=RunnerSettings(device="cpu", models_dir=models_dir,
                                  ffmpeg_timeout_s=settings.get("ffmpeg_timeout_s", 3600))))
        core.start(None)
        created.append(core)
        return core

    yield make
    for core in created:
        core.stop()


def submit(core: ServiceCore, media_dir: Path, audio: str = "speech_short.wav"):
    job_id, job_dir = core.manager.new_upload()
    (job_dir / "input_video.mp4").write_bytes((media_dir / "face.mp4").read_bytes())
    (job_dir / "input_audio.wav").write_bytes((media_dir / audio).read_bytes())
    return core.manager.submit(job_id, video_file="input_video.mp4", audio_file="input_audio.wav",
                               video_filename="face.mp4", audio_filename=audio, params=JobParams())


def test_a_job_completes_when_the_gpu_needs_smaller_batches(service, model, media_dir):
    core = service(OomAbove(model, limit=2))
    job = core.manager.wait(submit(core, media_dir).job_id, timeout=120)
    assert job.status == "completed", job.error
    assert core.runner.stats.oom_splits >= 1


def test_a_job_fails_cleanly_when_even_one_frame_does_not_fit(service, model, media_dir):
    core = service(OomAbove(model, limit=0))
    job = core.manager.wait(submit(core, media_dir).job_id, timeout=120)
    assert job.status == "failed" and "out of memory" in job.error
    job_dir = core.files.job_dir(job.job_id)
    assert not core.files.output_path(job.job_id).exists()
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".") or p.suffix == ".rgb"]  # no temp left


def test_a_full_disk_refuses_new_jobs_and_fails_running_ones_without_touching_finished_results(
        service, media_dir, monkeypatch):
    core = service(free_space_floor_mb=1)
    done = core.manager.wait(submit(core, media_dir).job_id, timeout=120)
    assert done.status == "completed"
    result = core.manager.output_path(done.job_id)
    digest = hashlib.sha256(result.read_bytes()).hexdigest()

    running = submit(core, media_dir, "speech_long.wav")
    deadline = time.monotonic() + 60
    while core.manager.get(running.job_id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    monkeypatch.setattr(type(core.files), "free_bytes", lambda self: 1024)  # the disk fills up
    failed = core.manager.wait(running.job_id, timeout=120)
    assert failed.status == "failed" and "disk space" in failed.error
    with pytest.raises(InsufficientStorageError) as refused:
        core.manager.new_upload()
    assert refused.value.http_status == 507
    assert hashlib.sha256(result.read_bytes()).hexdigest() == digest  # finished results untouched
    assert not core.files.output_path(running.job_id).exists()


@pytest.fixture
def hanging_ffmpeg(tmp_path, monkeypatch) -> Path:
    """An ffmpeg that probes normally but hangs forever when asked to stream RGB frames."""
    from lipsync_runner.media.ffmpeg import ffmpeg_exe

    real = ffmpeg_exe()
    script = tmp_path / "ffmpeg"
    script.write_text(f"""#!/bin/sh
case "$*" in *-frames:v*) ;; *rgb24*) exec sleep 600 ;; esac
exec "{real}" "$@"
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("LIP_SYNC_FFMPEG", str(script))
    return script


def test_a_hanging_ffmpeg_fails_the_job_after_a_bounded_time(service, media_dir, hanging_ffmpeg):
    core = service(ffmpeg_timeout_s=3)
    start, start_wall = time.monotonic(), time.time() - 1
    job = core.manager.wait(submit(core, media_dir).job_id, timeout=90)
    assert job.status == "failed", job
    assert "timed out" in job.error
    assert time.monotonic() - start < 30
    import psutil

    hung = [p for p in psutil.process_iter(["cmdline", "create_time"])
            if p.info["cmdline"] == ["sleep", "600"] and p.info["create_time"] >= start_wall]
    assert hung == []  # the stuck "ffmpeg" was killed, not left behind
