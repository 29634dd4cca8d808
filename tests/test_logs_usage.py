"""Structured JSON logs (redacted) and per-owner usage (ledger and Prometheus counters).

The ledger's tests run against both stores: SQLite (its own file) and PostgreSQL (the job
database replicas share; a second job store is a second replica, or the process restarted).
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from datetime import date, datetime, timedelta, timezone

import prometheus_client
import pytest

from lipsync_runner.jobs.records import JobRecord, JobStatus, new_job_id
from lipsync_runner.config import LogSettings
from lipsync_runner.jobs.logs import Redactor, configure_logging, log_job_event
from lipsync_runner.integration.usage import SQLiteUsageLedger, UsageEntry, account_job, default_window, usage_entry

DAY1 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)


def record(status: JobStatus = JobStatus.completed, owner: str | None = "3f2a9c0d1e4b5a6978c0d1e2", **kw) -> JobRecord:
    base = dict(job_id=new_job_id(), status=status, owner=owner, stage="done", frames=250, attempts=1,
                video_filename="ACME_confidential_launch.mp4", audio_filename="voice_fr.wav",
                video_file="input_video.mp4", audio_file="input_audio.wav", completed_at=DAY1,
                timings={"faces_s": 1.25, "generate_s": 8.5, "queue_s": 0.2, "total_s": 11.0})
    return JobRecord(**{**base, **kw})


@pytest.fixture
def json_log(tmp_path):
    """A logger whose handler writes JSON lines into a buffer (as LIP_SYNC_LOG_FORMAT=json does)."""
    logger = logging.getLogger(f"test.json.{uuid.uuid4().hex}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    buffer = io.StringIO()
    redactor = Redactor(secrets=["whsec_live_7d1e9b", "tok_live_5c3a"], data_dir=tmp_path / "data")
    assert configure_logging(LogSettings(log_format="json"), logger=logger, stream=buffer, redactor=redactor)

    def lines() -> list[dict]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    yield logger, lines, buffer


def test_a_job_event_is_one_json_line_with_ids_stage_and_durations(json_log):
    logger, lines, buffer = json_log
    rec = record()
    log_job_event(logger, rec, "completed", output_seconds=10.0)
    (line,) = lines()
    assert line["event"] == "completed" and line["job_id"] == rec.job_id and line["owner"] == rec.owner
    assert (line["status"], line["stage"], line["attempt"], line["frames"]) == ("completed", "done", 1, 250)
    assert line["durations_s"] == {"faces_s": 1.25, "generate_s": 8.5, "queue_s": 0.2, "total_s": 11.0}
    assert line["output_seconds"] == 10.0 and line["level"] == "INFO" and line["time"]
    assert line["message"] == f"job {rec.job_id}: completed"
    assert "ACME_confidential" not in buffer.getvalue() and "input_video" not in buffer.getvalue()
    log_job_event(logger, record(owner=None), "queued")
    assert lines()[1]["owner"] == "anonymous"


def test_tokens_secrets_signed_urls_and_data_paths_never_reach_the_log(json_log, tmp_path):
    logger, lines, buffer = json_log
    data_file = tmp_path / "data" / "jobs" / "0f0e" / "input_video.mp4"
    logger.warning("request with Authorization: Bearer tok_live_5c3a from %s", "203.0.113.9")
    logger.info("fetching https://AKIA:pw123@bucket.example.com/in/clip.mp4?X-Amz-Signature=deadbeef&x=1")
    logger.info("webhook secret is whsec_live_7d1e9b; api_key=k_99 token=abc")
    logger.info("reading %s", data_file, extra={"path": str(data_file)})
    try:
        raise RuntimeError("upstream said: Bearer tok_live_5c3a")
    except RuntimeError:
        logger.exception("job failed")
    text = buffer.getvalue()
    for secret in ("tok_live_5c3a", "pw123", "AKIA", "deadbeef", "whsec_live_7d1e9b", "k_99", "token=abc",
                   str(tmp_path)):
        assert secret not in text, secret
    got = lines()
    assert got[1]["message"] == "fetching https://bucket.example.com/in/clip.mp4"  # where, without the credentials
    assert got[3]["path"] == "$LIP_SYNC_DATA_DIR/jobs/0f0e/input_video.mp4"
    assert "RuntimeError" in got[4]["exception"] and "[redacted]" in got[4]["exception"]
    assert len(text.splitlines()) == 5  # one line per event, also for a traceback


def test_text_format_is_the_default(monkeypatch):
    monkeypatch.delenv("LIP_SYNC_LOG_FORMAT", raising=False)
    logger = logging.getLogger(f"test.text.{uuid.uuid4().hex}")
    assert configure_logging(logger=logger) is False and logger.handlers == []
    monkeypatch.setenv("LIP_SYNC_LOG_FORMAT", "json")
    assert LogSettings().log_format == "json"


# ------------------------------------------------------------------------------ usage


@pytest.fixture(params=["sqlite", "postgres"])
def open_ledger(request, tmp_path):
    """Opens the ledger as one more process on the same store (PostgreSQL: a job store with its own pool)."""
    opened: list = []
    job_stores: list = []
    if request.param == "postgres":
        from lipsync_runner.jobs.postgres import PostgresJobStore
        from lipsync_runner.integration.postgres import PostgresUsageLedger

        url = request.getfixturevalue("pg_database")

        def open_one():
            job_stores.append(PostgresJobStore(url, pool_size=2))
            if len(job_stores) == 1:
                with job_stores[0].connection() as conn:  # every test starts from an empty ledger
                    conn.execute("TRUNCATE usage_jobs")
            opened.append(PostgresUsageLedger(job_stores[-1]))
            return opened[-1]
    else:
        def open_one():
            opened.append(SQLiteUsageLedger(tmp_path / "jobs.sqlite3"))
            return opened[-1]
    yield open_one
    for led in opened:
        led.close()
    for store in job_stores:
        store.close()


@pytest.fixture
def ledger(open_ledger):
    return open_ledger()


def test_usage_is_counted_once_per_job_and_scoped_to_its_owner(ledger):
    a, b = "owner_a_" + uuid.uuid4().hex[:8], "owner_b_" + uuid.uuid4().hex[:8]
    done = record(owner=a)
    assert ledger.record(usage_entry(done, 10.0)) is True
    assert ledger.record(usage_entry(done, 10.0)) is False  # recorded again after a restart: counted once
    ledger.record(usage_entry(record(owner=a, completed_at=DAY1 + timedelta(days=1), frames=50), 2.0))
    ledger.record(usage_entry(record(JobStatus.failed, owner=a, frames=None, error="no face"), 0.0))
    ledger.record(usage_entry(record(owner=b, frames=1000), 40.0))
    ledger.record(usage_entry(record(owner=None), 10.0))
    mine = ledger.summary(a, date(2026, 3, 1), date(2026, 3, 31))
    assert (mine.jobs, mine.completed, mine.failed, mine.output_seconds, mine.frames) == (3, 2, 1, 12.0, 300)
    assert [(d.date, d.jobs, d.frames) for d in mine.days] == [("2026-03-01", 2, 250), ("2026-03-02", 1, 50)]
    assert ledger.summary(b, date(2026, 3, 1), date(2026, 3, 31)).frames == 1000
    assert ledger.summary(None, date(2026, 3, 1), date(2026, 3, 31)).jobs == 1  # unscoped jobs: one owner
    assert ledger.summary(a, date(2026, 3, 2), date(2026, 3, 2)).jobs == 1  # the range is honoured
    assert ledger.summary("nobody", date(2026, 3, 1), date(2026, 3, 31)).jobs == 0


def test_failed_jobs_count_as_jobs_but_not_as_output(ledger):
    entry = usage_entry(record(JobStatus.failed, frames=120), 5.0)
    assert (entry.output_seconds, entry.frames) == (0.0, 0)
    with pytest.raises(ValueError, match="has not finished"):
        usage_entry(record(JobStatus.processing), 0.0)


def test_prometheus_usage_counters_follow_the_ledger(ledger):
    owner = "owner_" + uuid.uuid4().hex[:12]
    sample = prometheus_client.REGISTRY.get_sample_value
    rec = record(owner=owner, frames=250)
    assert account_job(ledger, rec, 10.0) is True
    assert account_job(ledger, rec, 10.0) is False  # no double count
    account_job(ledger, record(JobStatus.cancelled, owner=owner), 0.0)
    assert sample("lipsync_usage_jobs_total", {"owner": owner, "status": "completed"}) == 1
    assert sample("lipsync_usage_jobs_total", {"owner": owner, "status": "cancelled"}) == 1
    assert sample("lipsync_usage_output_seconds_total", {"owner": owner}) == 10.0
    assert sample("lipsync_usage_frames_total", {"owner": owner}) == 250


def test_usage_survives_a_restart_and_old_rows_are_purged(open_ledger):
    first = open_ledger()
    job_id = new_job_id()
    first.record(UsageEntry(job_id, "o", JobStatus.completed, DAY1, 3.0, 75))
    first.close()
    second = open_ledger()
    assert second.record(UsageEntry(job_id, "o", JobStatus.completed, DAY1, 3.0, 75)) is False  # finished twice
    assert second.summary("o", date(2026, 3, 1), date(2026, 3, 1)).frames == 75
    assert second.purge(DAY1 + timedelta(days=1)) == 1
    assert default_window(date(2026, 3, 31)) == (date(2026, 3, 2), date(2026, 3, 31))
