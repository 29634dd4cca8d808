"""Prometheus metrics of the service (served on /metrics by BentoML, all processes merged)."""

from __future__ import annotations

import threading

FRAME_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)

# Built once, on first use, under a lock: two jobs finishing at once in one process must not both
# register the instruments (prometheus refuses the second with DuplicateTimeseries, which failed
# the job). lru_cache gives no such guarantee.
_INSTRUMENTS: dict | None = None
_LOCK = threading.Lock()


def _instruments() -> dict:
    global _INSTRUMENTS
    with _LOCK:
        if _INSTRUMENTS is None:
            _INSTRUMENTS = _build()
        return _INSTRUMENTS


def _build() -> dict:
    import bentoml

    return {
        "duration": bentoml.metrics.Histogram(
            name="lipsync_job_duration_seconds", documentation="Processing time of completed jobs",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)),
        "frames": bentoml.metrics.Counter(name="lipsync_frames_generated",
                                          documentation="Video frames written by completed jobs"),
        "batch": bentoml.metrics.Histogram(
            name="lipsync_runner_batch_size", documentation="Rows per runner batch, by endpoint",
            labelnames=["endpoint"], buckets=FRAME_BUCKETS),
        "jobs_per_batch": bentoml.metrics.Histogram(
            name="lipsync_runner_jobs_per_batch", documentation="Distinct jobs in one generate batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32)),
        # usage by owner (a token's hash, or "anonymous"): one label value per API token
        "usage_jobs": bentoml.metrics.Counter(name="lipsync_usage_jobs", labelnames=["owner", "status"],
                                              documentation="Finished jobs by owner and final status"),
        "usage_seconds": bentoml.metrics.Counter(name="lipsync_usage_output_seconds", labelnames=["owner"],
                                                 documentation="Seconds of lip-synced video written, by owner"),
        "usage_frames": bentoml.metrics.Counter(name="lipsync_usage_frames", labelnames=["owner"],
                                                documentation="Frames of lip-synced video written, by owner"),
        "live_sessions": bentoml.metrics.Counter(name="lipsync_live_sessions", labelnames=["close_code"],
                                                 documentation="Finished live sessions by close code"),
        "live_frames": bentoml.metrics.Counter(name="lipsync_live_frames", labelnames=["kind"],
                                               documentation="Live sessions' frames: speech, silent, idle, dropped"),
    }


def job_finished(seconds: float, frames: int) -> None:
    m = _instruments()
    m["duration"].observe(seconds)
    m["frames"].inc(frames)


def usage_recorded(owner: str, status: str, output_seconds: float, frames: int) -> None:
    """One finished job in the usage counters (called once per job, by `usage.account_job`)."""
    m = _instruments()
    m["usage_jobs"].labels(owner=owner, status=status).inc()
    if output_seconds > 0:
        m["usage_seconds"].labels(owner=owner).inc(output_seconds)
    if frames > 0:
        m["usage_frames"].labels(owner=owner).inc(frames)


def live_session_ended(close_code: int, frames: dict[str, int]) -> None:
    """One live session closed; ``frames``: its frame counts by kind (speech, silent, idle, dropped)."""
    m = _instruments()
    m["live_sessions"].labels(close_code=str(close_code)).inc()
    for kind, count in frames.items():
        if count > 0:
            m["live_frames"].labels(kind=kind).inc(count)


def batch_served(endpoint: str, rows: int, jobs: int) -> None:
    m = _instruments()
    m["batch"].labels(endpoint=endpoint).observe(rows)
    if endpoint == "generate":
        m["jobs_per_batch"].observe(jobs)


def job_counts_text(counts: dict[str, int]) -> str:
    """Current jobs by status, from the job store (so it is right after restarts too)."""
    lines = ["# HELP lipsync_jobs Jobs in the store by status", "# TYPE lipsync_jobs gauge"]
    for status in ("queued", "processing", "completed", "failed", "cancelled"):
        lines.append(f'lipsync_jobs{{status="{status}"}} {counts.get(status, 0)}')
    return "\n".join(lines) + "\n"
