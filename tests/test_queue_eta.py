"""Queue position and ETA from the queue and recent throughput (a pure function)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from lipsync_runner.jobs.eta import (
    Estimate,
    FinishedJob,
    QueuedJob,
    RunningJob,
    estimate_from_records,
    estimate_queue,
)
from lipsync_runner.jobs.records import JobRecord, JobStatus

TEN_S = [FinishedJob(10.0), FinishedJob(10.0), FinishedJob(10.0)]


def queue(*ids: str, frames: int | None = None) -> list[QueuedJob]:
    return [QueuedJob(i, frames) for i in ids]


def test_without_history_positions_are_known_and_etas_are_not():
    est = estimate_queue(queue("a", "b", "c"), [], [], workers=2)
    assert est == {"a": Estimate(1, None, None), "b": Estimate(2, None, None), "c": Estimate(3, None, None)}


def test_one_idle_worker_runs_the_queue_in_claim_order():
    est = estimate_queue(queue("a", "b", "c"), [], TEN_S, workers=1)
    assert [(est[j].queue_position, est[j].starts_in_s, est[j].eta_s) for j in "abc"] == [
        (1, 0.0, 10.0), (2, 10.0, 20.0), (3, 20.0, 30.0)]


def test_parallel_workers_share_the_queue():
    est = estimate_queue(queue("a", "b", "c", "d", "e"), [], TEN_S, workers=2)
    assert [est[j].eta_s for j in "abcde"] == [10.0, 10.0, 20.0, 20.0, 30.0]


def test_a_running_job_extrapolates_its_own_progress():
    """Half done after 6 s: 6 s left (the 10 s history does not matter for it); the next job waits for it."""
    est = estimate_queue(queue("q"), [RunningJob("r", elapsed_s=6.0, progress=0.5)], TEN_S, workers=1)
    assert est["r"] == Estimate(None, 0.0, 6.0)
    assert est["q"] == Estimate(1, 6.0, 16.0)


def test_a_job_that_just_started_uses_the_history():
    est = estimate_queue(queue("q"), [RunningJob("r", elapsed_s=4.0, progress=0.01)], TEN_S, workers=1)
    assert est["r"].eta_s == 6.0 and est["q"].eta_s == 16.0
    overdue = estimate_queue([], [RunningJob("r", elapsed_s=25.0, progress=0.02)], TEN_S, workers=1)
    assert overdue["r"].eta_s == 0.0  # never negative


def test_longer_videos_take_longer():
    history = [FinishedJob(10.0, frames=100), FinishedJob(5.0, frames=50), FinishedJob(2.0, frames=20)]
    est = estimate_queue([QueuedJob("long", 300), QueuedJob("unknown")], [], history, workers=1)
    assert est["long"].eta_s == 30.0  # 0.1 s per frame
    assert est["unknown"].eta_s == 30.0 + 5.0  # no frame count: the median job (5 s)


def test_one_stuck_job_does_not_swing_the_estimate():
    est = estimate_queue(queue("a"), [], [*TEN_S, FinishedJob(1000.0)], workers=1)
    assert est["a"].eta_s == 10.0


def test_more_running_jobs_than_local_workers():
    """With a shared queue other replicas run jobs too: each running job holds a slot somewhere."""
    running = [RunningJob("r1", 5.0, 0.5), RunningJob("r2", 8.0, 0.8)]
    est = estimate_queue(queue("q"), running, TEN_S, workers=1)
    assert est["q"].starts_in_s == 2.0 and est["q"].eta_s == 12.0  # r2 frees its slot first


def test_workers_must_be_positive():
    with pytest.raises(ValueError):
        estimate_queue([], [], [], workers=0)


def test_estimates_from_store_records():
    now = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)

    def rec(job_id: str, status: JobStatus, **kw) -> JobRecord:
        return JobRecord(job_id=job_id, status=status, video_filename="v.mp4", audio_filename="a.wav",
                         video_file="input_video.mp4", audio_file="input_audio.wav", **kw)

    done = [rec(f"d{i}", JobStatus.completed, frames=100, timings={"queue_s": 30.0, "total_s": 40.0})
            for i in range(3)]  # 10 s of processing each: the time queued does not count
    running = [rec("r", JobStatus.processing, progress=0.25, started_at=now - timedelta(seconds=3))]
    queued = [rec("q1", JobStatus.queued), rec("q2", JobStatus.queued)]
    est = estimate_from_records(queued, running, done, workers=1, now=now, expected_frames={"q2": 200})
    assert est["r"].eta_s == 9.0
    assert est["q1"] == Estimate(1, 9.0, 19.0)
    assert est["q2"] == Estimate(2, 19.0, 39.0)  # 200 frames at 0.1 s
