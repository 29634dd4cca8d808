"""Webhooks: the signature scheme, the outbox, and deliveries to a real HTTP receiver on the loopback.

The receiver is a real server; every delivery it records is checked with the SDK's
`verify_webhook`, the way a customer's endpoint would check it. Every outbox test runs against
both stores: SQLite (one file, as one machine has it) and PostgreSQL (the job database that
replicas share; tests/backends.py), each "process" or replica with its own connection(s).
Leases are on the store's clock (the database's, for PostgreSQL), so the tests use real time
and short leases.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lipsync_client import Job, WebhookVerificationError, verify_webhook
from lipsync_runner.errors import InvalidInputError
from lipsync_runner.jobs.records import JobRecord, JobStatus, new_job_id
from lipsync_runner.inputs.netguard import AddressPolicy, parse_allowlist
from lipsync_runner.params import JobParams, WebhookEvent, parse_fields
from lipsync_runner.integration.webhooks import (
    RetryPolicy,
    SQLiteWebhookOutbox,
    WebhookDelivery,
    WebhookDispatcher,
    WebhookNotifier,
    deliveries_status,
    signature_header,
)
from lipsync_runner.config import WebhookSettings
from tests.concurrency import raised, run_together
from tests.loopback_http import LoopbackServer, Reply

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_test_3f9a"
LOOPBACK_OK = AddressPolicy(allowlist=parse_allowlist("127.0.0.1"))


def job(url: str | None, events: str | None = None, status: JobStatus = JobStatus.completed, **kw) -> JobRecord:
    fields = {"webhook_url": url, "webhook_events": events}
    return JobRecord(job_id=new_job_id(), status=status, params=parse_fields({k: v for k, v in fields.items() if v}),
                     video_filename="face.mp4", audio_filename="speech.wav", video_file="input_video.mp4",
                     audio_file="input_audio.wav", **kw)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def settings(**kw) -> WebhookSettings:
    return WebhookSettings(webhook_secret=SECRET, webhook_timeout_s=kw.pop("timeout", 2.0), **kw)


@pytest.fixture(params=["sqlite", "postgres"])
def open_outbox(request, tmp_path):
    """Opens the outbox as one more process (SQLite: one more connection to the file) or replica
    (PostgreSQL: one more job store with its own pool) on the same shared store."""
    opened: list = []
    if request.param == "postgres":
        from lipsync_runner.jobs.postgres import PostgresJobStore
        from lipsync_runner.integration.postgres import PostgresWebhookOutbox

        url = request.getfixturevalue("pg_database")
        stores: list[PostgresJobStore] = []

        def open_one():
            stores.append(PostgresJobStore(url, pool_size=2))
            if len(stores) == 1:
                with stores[0].connection() as conn:  # every test starts from an empty outbox
                    conn.execute("TRUNCATE webhook_deliveries")
            opened.append(PostgresWebhookOutbox(stores[-1]))
            return opened[-1]
    else:
        def open_one():
            opened.append(SQLiteWebhookOutbox(tmp_path / "jobs.sqlite3"))
            return opened[-1]
        stores = []
    yield open_one
    for box in opened:
        box.close()
    for store in stores:
        store.close()


@pytest.fixture
def outbox(open_outbox):
    return open_outbox()


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------ signatures


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    body, t = b'{"job_id":"x","event":"completed"}', 1_700_000_000
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    header = signature_header(body, [SECRET], t)
    assert header == f"t=1700000000,v1={expected}"  # the documented scheme, byte for byte
    assert verify_webhook(body, header, SECRET, now=t + 299) == {"job_id": "x", "event": "completed"}


def test_verify_refuses_what_the_secret_did_not_sign_or_that_is_stale():
    body, t = b'{"status":"completed"}', 1_700_000_000
    header = signature_header(body, [SECRET], t)
    refused = {
        "tampered body": (body.replace(b"completed", b"failed"), header, SECRET, t),
        "wrong secret": (body, header, "whsec_other", t),
        "too old": (body, header, SECRET, t + 301),
        "from the future": (body, header, SECRET, t - 301),
        "timestamp changed": (body, header.replace("t=1700000000", "t=1700000100"), SECRET, t + 100),
        "no signature": (body, "t=1700000000", SECRET, t),
        "no timestamp": (body, header.split(",", 1)[1], SECRET, t),
        "garbage": (body, "nonsense", SECRET, t),
        "missing header": (body, None, SECRET, t),
    }
    for name, (b, h, s, now) in refused.items():
        with pytest.raises(WebhookVerificationError):
            verify_webhook(b, h, s, now=now)
            pytest.fail(name)
    not_json = b"not json"
    with pytest.raises(WebhookVerificationError, match="not JSON"):
        verify_webhook(not_json, signature_header(not_json, [SECRET], t), SECRET, now=t)


def test_secret_rotation_signs_with_every_secret():
    body, t = b"{}", int(time.time())
    header = signature_header(body, ["whsec_new", "whsec_old"], t)
    assert header.count("v1=") == 2
    assert verify_webhook(body, header, "whsec_old") == {} and verify_webhook(body, header, "whsec_new") == {}
    with pytest.raises(WebhookVerificationError):
        verify_webhook(body, header, "whsec_neither")


def test_webhook_params_are_validated():
    p = parse_fields({"webhook_url": "https://hooks.example.com/lipsync?k=1", "webhook_events": "started,completed"})
    assert p.selected_webhook_events == {WebhookEvent.started, WebhookEvent.completed}
    assert parse_fields({"webhook_url": "http://h.example/x"}).selected_webhook_events == {
        WebhookEvent.completed, WebhookEvent.failed, WebhookEvent.cancelled}
    assert JobParams().selected_webhook_events == frozenset()
    for bad, why in [({"webhook_url": "ftp://h.example/x"}, "http:// or https://"),
                     ({"webhook_url": "javascript:alert(1)"}, "http:// or https://"),
                     ({"webhook_url": "https://"}, "no host"),
                     ({"webhook_url": "https://h.example/" + "a" * 2100}, "at most 2048"),
                     ({"webhook_url": "https://h.example/a b"}, "spaces"),
                     ({"webhook_url": "https://h.example/", "webhook_events": "completed,finished"}, "webhook_events"),
                     ({"webhook_events": "completed"}, "needs a webhook_url")]:
        with pytest.raises(InvalidInputError, match=why):
            parse_fields(bad)


# ------------------------------------------------------------------------------ the outbox


def delivery(job_id: str = "j1", event: WebhookEvent = WebhookEvent.completed, url: str = "http://h.example/",
             **kw) -> WebhookDelivery:
    return WebhookDelivery(job_id=job_id, event=event, url=url, body=json.dumps({"job_id": job_id}), **kw)


def test_outbox_claims_are_leases(outbox):
    lease_s, retry_s = 0.3, 0.6
    now = utcnow()
    a, b = outbox.enqueue(delivery("a", created_at=now, next_attempt_at=now)), outbox.enqueue(delivery("b"))
    later = outbox.enqueue(delivery("c", next_attempt_at=now + timedelta(hours=1)))
    claimed = outbox.claim(utcnow(), limit=10, lease_s=lease_s)
    assert [d.delivery_id for d in claimed] == [a.delivery_id, b.delivery_id]  # oldest due first; c is not due
    assert outbox.claim(utcnow(), limit=10, lease_s=lease_s) == []  # leased: nobody else takes them
    time.sleep(lease_s + 0.1)
    again = outbox.claim(utcnow(), limit=10, lease_s=30)  # the lease ran out (its dispatcher died)
    assert {d.delivery_id for d in again} == {a.delivery_id, b.delivery_id}
    outbox.record_attempt(a.delivery_id, at=utcnow(), status=200, error=None, delivered=True, next_attempt_at=None)
    at = utcnow()
    outbox.record_attempt(b.delivery_id, at=at, status=500, error="HTTP 500", delivered=False,
                          next_attempt_at=at + timedelta(seconds=retry_s))
    assert outbox.claim(utcnow(), limit=10, lease_s=30) == []  # b's retry is not due yet
    time.sleep(retry_s + 0.1)
    assert [d.job_id for d in outbox.claim(utcnow(), limit=10, lease_s=30)] == ["b"]
    (row,) = outbox.for_job("a")
    assert (row.state, row.attempts, row.last_status, row.next_attempt_at) == ("delivered", 1, 200, None)
    assert abs(outbox.next_due() - (utcnow() + timedelta(seconds=30))) < timedelta(seconds=2)  # b's lease
    outbox.record_attempt(b.delivery_id, at=utcnow(), status=200, error=None, delivered=True, next_attempt_at=None)
    assert outbox.next_due() == later.next_attempt_at
    outbox.delete_job("c")
    assert outbox.for_job("c") == [] and outbox.next_due() is None


def test_two_outboxes_on_one_store_never_claim_the_same_row(open_outbox):
    """Two replicas' dispatchers claiming at once from one store: every row is claimed exactly once
    (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: BEGIN IMMEDIATE)."""
    boxes = [open_outbox(), open_outbox()]
    for i in range(200):
        boxes[0].enqueue(delivery(f"job{i}"))
    claimed: list[list[str]] = [[], []]

    def claim_all(i: int) -> None:
        while rows := boxes[i].claim(utcnow(), limit=3, lease_s=600):
            claimed[i].extend(d.job_id for d in rows)

    assert raised(run_together(claim_all, 2)) == []
    assert not set(claimed[0]) & set(claimed[1])
    assert sorted(claimed[0] + claimed[1]) == sorted(f"job{i}" for i in range(200))


# ------------------------------------------------------------------------------ events


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_notifier_sends_only_the_events_the_job_asked_for(outbox):
    notifier = WebhookNotifier(outbox)
    default = job("https://h.example/hook", status=JobStatus.processing)
    assert notifier.job_event(default, WebhookEvent.started) is None  # default: the job's end only
    assert notifier.job_event(default, WebhookEvent.progress) is None
    assert notifier.job_event(default.model_copy(update={"status": JobStatus.failed, "error": "no face"}),
                              WebhookEvent.failed) is not None
    assert notifier.job_event(job(None), WebhookEvent.completed) is None  # no webhook_url: nothing
    chosen = job("https://h.example/hook", "started", status=JobStatus.processing)
    assert notifier.job_event(chosen, WebhookEvent.started) is not None
    assert notifier.job_event(chosen, WebhookEvent.completed) is None
    assert [d.event for d in outbox.for_job(default.job_id)] == [WebhookEvent.failed]


def test_the_body_is_the_jobs_status_plus_the_event(outbox):
    rec = job("https://h.example/hook", status=JobStatus.completed, frames=50, timings={"total_s": 3.5})
    d = WebhookNotifier(outbox).job_event(rec, WebhookEvent.completed)
    body = json.loads(d.body)
    assert body["job_id"] == rec.job_id and body["status"] == "completed" and body["frames"] == 50
    assert body["download_url"] == f"/api/lip-sync/download/{rec.job_id}"
    assert body["event"] == "completed" and body["event_id"] == d.delivery_id and body["event_at"]
    parsed = Job.model_validate(body)  # a receiver reads it with the SDK's status model
    assert parsed.finished and parsed.timings == {"total_s": 3.5}


def test_progress_is_throttled_and_coalesced(outbox):
    clock = Clock()
    notifier = WebhookNotifier(outbox, progress_interval_s=10, monotonic=clock)
    rec = job("https://h.example/hook", "progress,completed", status=JobStatus.processing)
    first = notifier.job_event(rec.model_copy(update={"progress": 0.1}), WebhookEvent.progress)
    clock.t += 5
    assert notifier.job_event(rec.model_copy(update={"progress": 0.2}), WebhookEvent.progress) is None  # throttled
    clock.t += 6
    second = notifier.job_event(rec.model_copy(update={"progress": 0.5}), WebhookEvent.progress)
    # the undelivered first progress was replaced: a slow receiver gets the newest, not a backlog
    assert [(d.delivery_id, json.loads(d.body)["progress"]) for d in outbox.for_job(rec.job_id)] == [
        (second.delivery_id, 0.5)]
    assert first.delivery_id != second.delivery_id
    notifier.job_event(rec.model_copy(update={"status": JobStatus.completed, "progress": 1.0}),
                       WebhookEvent.completed)
    assert [d.event for d in outbox.for_job(rec.job_id)] == [WebhookEvent.completed]  # the end drops stale progress


# ------------------------------------------------------------------------------ delivery


@pytest.fixture
def receiver():
    with LoopbackServer() as srv:
        yield srv


def script(*steps):
    """A receiver route that answers with each step in turn (an int status, or ("slow", seconds)), then 200."""
    answers = list(steps)
    lock = threading.Lock()

    def route(req):
        with lock:
            step = answers.pop(0) if answers else 200
        if isinstance(step, tuple):
            time.sleep(step[1])
            step = 200
        return Reply(step, body=b"ok")
    return route


def test_delivery_is_signed_and_retried_with_backoff_after_the_receiver_fails_twice(receiver, outbox):
    receiver.routes["/hook"] = script(500, ("slow", 3.0))  # an error, then no answer in time, then 200
    rec = job(receiver.url("/hook"), status=JobStatus.completed, frames=50)
    retry = RetryPolicy(first_delay_s=0.2, factor=2, jitter=0)
    with WebhookDispatcher(outbox, settings(timeout=1.0), policy=LOOPBACK_OK, retry=retry, poll_s=0.05) as dispatcher:
        notifier = WebhookNotifier(outbox, wake=dispatcher.wake)
        d = notifier.job_event(rec, WebhookEvent.completed)
        row = wait_for(lambda: next((r for r in outbox.for_job(rec.job_id) if r.state == "delivered"), None))
    hits = receiver.requests
    assert len(hits) == 3
    for i, hit in enumerate(hits, start=1):
        event = verify_webhook(hit.body, hit.headers["lipsync-signature"], SECRET)  # every attempt is signed
        assert event["job_id"] == rec.job_id and event["event"] == "completed" and event["event_id"] == d.delivery_id
        assert hit.headers["lipsync-event"] == "completed" and hit.headers["lipsync-event-id"] == d.delivery_id
        assert hit.headers["lipsync-attempt"] == str(i) and hit.headers["content-type"] == "application/json"
        assert hit.body == hits[0].body  # the same event, frozen
    gap1, gap2 = hits[1].at - hits[0].at, hits[2].at - hits[1].at
    # back-off doubles; the second also waited out the 1 s deadline, which counts from the attempt's start
    # (its connect included), a few ms before the receiver saw the request
    assert gap1 >= 0.2 and gap2 >= 1.0 + 0.4 - 0.05
    assert (row.attempts, row.last_status, row.last_error) == (3, 200, None)
    (status,) = deliveries_status(outbox, rec.job_id)
    assert status["state"] == "delivered" and status["attempts"] == 3 and status["delivered_at"]


def test_a_failing_receiver_is_given_up_after_the_bounded_time(receiver, outbox):
    receiver.routes["/hook"] = lambda req: Reply(503)
    retry = RetryPolicy(first_delay_s=0.05, factor=2, max_age_s=0.5, jitter=0)
    with WebhookDispatcher(outbox, settings(), policy=LOOPBACK_OK, retry=retry, poll_s=0.05) as dispatcher:
        rec = job(receiver.url("/hook"), status=JobStatus.failed, error="no face")
        WebhookNotifier(outbox, wake=dispatcher.wake).job_event(rec, WebhookEvent.failed)
        row = wait_for(lambda: next((r for r in outbox.for_job(rec.job_id) if r.state == "failed"), None))
    # at 0, 0.05, 0.15, 0.35 s (later on a loaded machine): the next (0.75 s) would be past 0.5 s
    assert 2 <= row.attempts == len(receiver.requests) <= 4
    assert (row.last_status, row.last_error, row.next_attempt_at) == (503, "HTTP 503", None)
    assert deliveries_status(outbox, rec.job_id)[0]["state"] == "failed"


def test_permanent_refusals_are_not_retried(receiver, outbox):
    """A receiver on a refused address (no allow-list), or one that answers 410 Gone, gets one attempt."""
    receiver.routes["/gone"] = lambda req: Reply(410)
    receiver.routes["/moved"] = lambda req: Reply(301, {"Location": "/elsewhere"})
    retry = RetryPolicy(first_delay_s=30, jitter=0)
    with WebhookDispatcher(outbox, settings(), policy=AddressPolicy(allowlist=parse_allowlist("localhost")),
                           retry=retry, poll_s=0.05) as dispatcher:
        notifier = WebhookNotifier(outbox, wake=dispatcher.wake)
        refused = job(receiver.url("/hook"))
        gone = job(receiver.url("/gone", host="localhost"))
        moved = job(receiver.url("/moved", host="localhost"))
        for rec in (refused, gone, moved):
            notifier.job_event(rec, WebhookEvent.completed)
        wait_for(lambda: all(outbox.for_job(rec.job_id)[0].attempts for rec in (refused, gone, moved)))
    by_job = {rec.job_id: outbox.for_job(rec.job_id)[0] for rec in (refused, gone, moved)}
    assert by_job[refused.job_id].state == "failed" and "cannot be reached" in by_job[refused.job_id].last_error
    assert by_job[gone.job_id].state == "failed" and by_job[gone.job_id].last_status == 410
    assert by_job[moved.job_id].state == "pending" and by_job[moved.job_id].last_error == "redirects are not followed"
    # the refused one never reached the receiver, and /elsewhere was never asked for
    assert sorted(receiver.paths()) == ["/gone", "/moved"]


def test_deliveries_survive_a_restart(receiver, open_outbox):
    """Rows written before a crash are delivered by the next process (or another replica), including
    one claimed by the dead one."""
    receiver.routes["/hook"] = lambda req: Reply(204)
    first = open_outbox()
    notifier = WebhookNotifier(first)  # no dispatcher runs: the process dies before delivering
    waiting = job(receiver.url("/hook"), status=JobStatus.completed)
    in_flight = job(receiver.url("/hook"), status=JobStatus.cancelled)
    notifier.job_event(waiting, WebhookEvent.completed)
    notifier.job_event(in_flight, WebhookEvent.cancelled)
    # the dead process had claimed both rows and never recorded an attempt
    assert len(first.claim(datetime.now(timezone.utc), limit=10, lease_s=0.5)) == 2
    first.close()
    second = open_outbox()
    with WebhookDispatcher(second, settings(), policy=LOOPBACK_OK, poll_s=0.05):
        for rec in (waiting, in_flight):
            wait_for(lambda rec=rec: second.for_job(rec.job_id)[0].state == "delivered")
    second.close()
    events = sorted(verify_webhook(r.body, r.headers["lipsync-signature"], SECRET)["event"] for r in receiver.requests)
    assert events == ["cancelled", "completed"]


def test_a_dispatcher_needs_a_secret(outbox, monkeypatch):
    monkeypatch.delenv("LIP_SYNC_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="LIP_SYNC_WEBHOOK_SECRET"):
        WebhookDispatcher(outbox, WebhookSettings())
    monkeypatch.setenv("LIP_SYNC_WEBHOOK_SECRET", "whsec_new, whsec_old")
    assert WebhookSettings().secrets == ("whsec_new", "whsec_old")


def test_the_verifier_needs_only_the_standard_library(tmp_path):
    """A receiver may copy lipsync_client/webhooks.py alone: it imports and verifies with httpx and pydantic blocked."""
    body, t = b'{"event":"completed"}', int(time.time())
    code = textwrap.dedent(f"""
        import importlib.util, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("httpx", "pydantic", "lipsync_client", "lipsync_runner"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        spec = importlib.util.spec_from_file_location("webhooks", {str(ROOT / "lipsync_client" / "webhooks.py")!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        print(mod.verify_webhook({body!r}, {signature_header(body, [SECRET], t)!r}, {SECRET!r})["event"])
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "completed"
