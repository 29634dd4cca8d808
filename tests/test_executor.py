"""The executor (serving/executor.py): what a claimed job's failure tells its user."""

from __future__ import annotations

from pathlib import Path

import pytest

from lipsync_runner.config import Settings
from lipsync_runner.errors import MediaProcessingError
from lipsync_runner.jobs.records import JobRecord, JobStatus
from lipsync_runner.params import JobParams
from lipsync_runner.serving.executor import JobExecutor


def test_a_failure_names_the_files_as_the_user_sent_them(tmp_path: Path, monkeypatch):
    job = JobRecord(job_id="3f2b2a4e-8c1d-4b7a-9e2f-0c1d2e3f4a5b", status=JobStatus.processing,
                    video_file="input_video.mp4", audio_file="input_audio.m4a", video_filename="interview.mp4",
                    audio_filename="french take 2.m4a", params=JobParams())
    executor = JobExecutor(Settings(), runner=None, files=None, scratch=None, integration=None, avatars=None)

    def fails(ctx):
        raise MediaProcessingError("input_audio.m4a: the audio stream ends early (input_video.mp4 is fine)")

    monkeypatch.setattr(executor, "_run_job", fails)
    ctx = type("Ctx", (), {"job": job})()
    with pytest.raises(MediaProcessingError) as failed:
        executor(ctx)
    assert str(failed.value) == failed.value.message == \
        "french take 2.m4a: the audio stream ends early (interview.mp4 is fine)"
