"""Queue position and ETA: a pure function of the queue and of recent throughput.

    estimate_queue(queued in claim order, running, recently finished, workers)
        -> {job_id: Estimate(queue_position, starts_in_s, eta_s)}

* ``queue_position`` is 1 for the job that starts next (None for a running job).
* A job's expected processing time comes from recent completed jobs: the median seconds per
  output frame times its frames when both are known (a 60 s clip takes longer than a 5 s
  one), else the median job duration. Medians, so one stuck or tiny job does not swing it.
* A running job's remaining time extrapolates its own progress once it has some (it knows
  its video better than the history does), else the expected time minus what has elapsed.
* The queue is replayed over ``workers`` slots (earliest free slot takes the next job), so
  ETAs reflect parallel workers; ``eta_s`` is seconds until the job is expected to finish.
* Without any history there is no estimate: ``eta_s`` is None, the position is still given.
* Claims are not first come first served: owners take turns (jobs/sql.py). :func:`claim_order`
  replays the turns to put the queued records in the order claims will take them.
"""

from __future__ import annotations

import heapq
import statistics
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Optional

from lipsync_runner.jobs.records import JobRecord

MIN_PROGRESS_FOR_EXTRAPOLATION = 0.1  # below this, early stages (decode, faces) say little about the rest


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    frames: Optional[int] = None  # expected output frames, when admission knows them


@dataclass(frozen=True)
class RunningJob:
    job_id: str
    elapsed_s: float
    progress: float = 0.0
    frames: Optional[int] = None


@dataclass(frozen=True)
class FinishedJob:
    duration_s: float  # processing time (start to end), not time spent queued
    frames: Optional[int] = None


@dataclass(frozen=True)
class Estimate:
    queue_position: Optional[int]
    starts_in_s: Optional[float]
    eta_s: Optional[float]


@dataclass(frozen=True)
class Throughput:
    seconds_per_frame: Optional[float]
    seconds_per_job: Optional[float]

    @classmethod
    def from_recent(cls, finished: Iterable[FinishedJob]) -> "Throughput":
        done = [f for f in finished if f.duration_s >= 0]
        rates = [f.duration_s / f.frames for f in done if f.frames]
        return cls(statistics.median(rates) if rates else None,
                   statistics.median(f.duration_s for f in done) if done else None)

    def job_seconds(self, frames: Optional[int]) -> Optional[float]:
        if frames and self.seconds_per_frame is not None:
            return self.seconds_per_frame * frames
        return self.seconds_per_job


def _remaining_s(job: RunningJob, throughput: Throughput) -> Optional[float]:
    if job.progress >= MIN_PROGRESS_FOR_EXTRAPOLATION:
        return max(0.0, job.elapsed_s * (1.0 - job.progress) / job.progress)
    expected = throughput.job_seconds(job.frames)
    return None if expected is None else max(0.0, expected - job.elapsed_s)


def estimate_queue(queued: Sequence[QueuedJob], running: Sequence[RunningJob], recent: Iterable[FinishedJob],
                   workers: int) -> dict[str, Estimate]:
    """Estimates for every queued and running job (see the module's docstring)."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    throughput = Throughput.from_recent(recent)
    estimates: dict[str, Estimate] = {}
    free_at: list[float] = []  # when each worker slot is next free, seconds from now
    known = True
    for job in running:
        remaining = _remaining_s(job, throughput)
        estimates[job.job_id] = Estimate(None, 0.0, None if remaining is None else round(remaining, 1))
        known = known and remaining is not None
        free_at.append(remaining or 0.0)
    # more running jobs than slots happens with a shared queue: those slots exist somewhere
    free_at.extend([0.0] * max(0, workers - len(free_at)))
    heapq.heapify(free_at)
    for position, job in enumerate(queued, start=1):
        expected = throughput.job_seconds(job.frames)
        if not known or expected is None:
            known = False
            estimates[job.job_id] = Estimate(position, None, None)
            continue
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + expected)
        estimates[job.job_id] = Estimate(position, round(start, 1), round(start + expected, 1))
    return estimates


# -------------------------------------------------------------------------- from job records


def claim_order(queued: Iterable[JobRecord], running: Iterable[JobRecord]) -> list[JobRecord]:
    """``queued`` in the order claims take them, as the store picks (jobs/sql.py): the owner with the
    fewest jobs running, then the one whose turn is longest ago, its oldest job; each job taken counts
    as running from then on. Which owner the store served last before now is not in the records:
    among owners not yet taken here, the one with the oldest job goes first."""
    waiting: dict[str | None, deque[JobRecord]] = {}
    for r in sorted(queued, key=lambda r: r.created_at):
        waiting.setdefault(r.owner, deque()).append(r)
    busy = Counter(r.owner for r in running)
    owners = list(waiting)
    # (jobs running, the step of the owner's last turn (-1: none here), its next job's age, the owner)
    turns = [(busy[owner], -1, jobs[0].created_at, i) for i, (owner, jobs) in enumerate(waiting.items())]
    heapq.heapify(turns)
    order: list[JobRecord] = []
    while turns:
        n, _, _, i = heapq.heappop(turns)
        jobs = waiting[owners[i]]
        order.append(jobs.popleft())
        if jobs:
            heapq.heappush(turns, (n + 1, len(order), jobs[0].created_at, i))
    return order


def finished_job(record: JobRecord) -> Optional[FinishedJob]:
    """A completed record's processing time (total minus queue), or None without timings."""
    total, queue = record.timings.get("total_s"), record.timings.get("queue_s")
    if total is None:
        return None
    return FinishedJob(max(0.0, total - (queue or 0.0)), record.frames)


def estimate_from_records(queued: Sequence[JobRecord], running: Sequence[JobRecord],
                          recent_completed: Iterable[JobRecord], workers: int, now: datetime,
                          expected_frames: Optional[dict[str, int]] = None) -> dict[str, Estimate]:
    """:func:`estimate_queue` over store records: ``queued`` in claim order, the last N completed ones."""
    frames = expected_frames or {}
    return estimate_queue(
        [QueuedJob(r.job_id, frames.get(r.job_id)) for r in queued],
        [RunningJob(r.job_id, max(0.0, (now - (r.started_at or now)).total_seconds()), r.progress,
                    frames.get(r.job_id)) for r in running],
        [f for f in map(finished_job, recent_completed) if f is not None],
        workers,
    )
