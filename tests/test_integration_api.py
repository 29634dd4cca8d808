"""Issue 14 wired into the one admission path and the operations, in process (no models, no server).

URL inputs, Idempotency-Key, webhook_url, queue position/ETA and usage through the real REST
app (api/rest.py -> admission -> operations) over the fake job manager of test_rest_api, with
a real `Integration` (its SQLite tables in a temp dir); the job manager's event hook with the
real JobManager; the worker's fetch step against a loopback file server.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from lipsync_runner.config import ApiLimits
from lipsync_runner.api import create_rest_app
from lipsync_runner.serving.core import download_url
from lipsync_runner.config import AuthSettings
from lipsync_runner.api.auth import BearerAuthMiddleware, owner_of
from lipsync_runner.integration.services import Integration, output_seconds
from lipsync_runner.inputs.validation import validate_media
from lipsync_runner.errors import InputTooLargeError, InvalidInputError
from lipsync_runner.inputs.reference import read_reference
from lipsync_runner.serving.job_inputs import prepare_inputs
from lipsync_runner.jobs import JobFiles, JobManager, JobOutcome, JobStatus, SQLiteJobStore
from lipsync_runner.jobs.records import JobRecord, utcnow
from lipsync_runner.inputs.netguard import AddressPolicy, parse_allowlist
from lipsync_runner.params import parse_fields
from lipsync_runner.integration.usage import UsageEntry
from lipsync_runner.config import WebhookSettings

from .loopback_http import LoopbackServer, Reply
from .test_rest_api import FakeManager, _files, media  # noqa: F401 - the media fixture

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_api_test"
LOOPBACK_OK = AddressPolicy(allowlist=parse_allowlist("127.0.0.1"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _health() -> dict:
    return {"status": "ready", "models_loaded": True}


DOWNLOAD_URL = download_url("/api/lip-sync")


class Setup:
    def __init__(self, tmp_path: Path, *, secret: str = SECRET, limits: ApiLimits | None = None,
                 wrap=None) -> None:
        (tmp_path / "jobs").mkdir(parents=True, exist_ok=True)
        self.fake = FakeManager(tmp_path / "jobs")
        self.integration = Integration(tmp_path / "data", records=self, download_url=DOWNLOAD_URL, workers=1,
                                       policy=LOOPBACK_OK, webhooks=WebhookSettings(webhook_secret=secret))
        self.integration.start()
        self.app = create_rest_app(self.fake, _health, limits or ApiLimits(), integration=self.integration)
        self.asgi = wrap(self.app) if wrap else self.app

    def get(self, job_id: str):
        return self.fake.jobs.get(job_id)

    def list(self, owner=None, limit=100, statuses=None):
        records = [r for r in self.fake.jobs.values() if statuses is None or r.status in statuses]
        return sorted(records, key=lambda r: r.created_at, reverse=True)[:limit]

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.asgi, client=("10.0.0.1", 5000)),
                                 base_url="http://t", headers=headers)

    def close(self) -> None:
        self.integration.stop()


@pytest.fixture
def setup(tmp_path):
    s = Setup(tmp_path)
    yield s
    s.close()


# --------------------------------------------------------------------------- inputs by URL


async def test_a_job_with_url_inputs_is_admitted_without_files(setup, media):
    async with setup.client() as c:
        resp = await c.post("/generate", json={"video_url": "https://bucket.example/in/face.mp4?X-Amz-Signature=s",
                                               "audio_url": "https://bucket.example/in/fr.wav", "bbox_shift": 2})
        assert resp.status_code == 202, resp.text
        job = setup.fake.submitted[-1]
        # a reference stands in the job's directory for each URL input; the worker fetches it
        assert (job["video_file"], job["audio_file"]) == ("input_video.url.json", "input_audio.url.json")
        assert (job["video_filename"], job["audio_filename"]) == ("face.mp4", "fr.wav")
        assert job["params"].video_url.endswith("X-Amz-Signature=s") and job["media"] is None
        reference = read_reference(setup.fake.root / job["job_id"] / "input_video.url.json")
        assert reference == {"input": "video", "source": "https://bucket.example/in/face.mp4"}  # no signature
        status = (await c.get(f"/status/{job['job_id']}")).json()
        assert (status["inputs"]["video_source"], status["inputs"]["audio_source"]) == ("url", "url")

        # one input uploaded, the other by URL (multipart): the upload is checked at once, by content
        files = _files(media)
        resp = await c.post("/generate", files={"audio": files["audio"]},
                            data={"video_url": "https://bucket.example/face.mp4"})
        assert resp.status_code == 202, resp.text
        job = setup.fake.submitted[-1]
        assert job["video_file"] == "input_video.url.json" and job["audio_file"] == "input_audio.wav"
        assert set(job["media"]) == {"audio"}

        # a form without files (what BentoML's own client sends then: urlencoded, values JSON-encoded)
        resp = await c.post("/generate", data={"video_url": '"https://bucket.example/a.mp4"',
                                               "audio_url": "https://bucket.example/b.wav", "video": "null"})
        assert resp.status_code == 202, resp.text
        assert setup.fake.submitted[-1]["params"].video_url == "https://bucket.example/a.mp4"


@pytest.mark.parametrize("body, status, expect", [
    ({"video_url": "https://b.example/a.mp4"}, 400, "Missing required file field(s): 'audio' (or give audio_url"),
    ({"video_url": "ftp://b.example/a.mp4", "audio_url": "https://b.example/a.wav"}, 400, "http:// or https://"),
    ({"video_url": "http://127.0.0.2:9/a.mp4", "audio_url": "https://b.example/a.wav"}, 400,
     "127.0.0.2 is a loopback address"),
    ({"video_url": "http://[::ffff:169.254.169.254]/", "audio_url": "https://b.example/a.wav"}, 400,
     "metadata address"),
    ({"video_url": "http://10.1.2.3/a.mp4", "audio_url": "https://b.example/a.wav"}, 400, "private address"),
    ({"video_url": "s3://bucket/a.mp4", "audio_url": "https://b.example/a.wav"}, 400, "object storage"),
    ({"video": "a.mp4", "audio": "b.wav"}, 400, "multipart/form-data"),
    ({"video_url": "https://b.example/a.mp4", "audio_url": "https://b.example/a.wav", "colour": "red"}, 400,
     "colour: unknown parameter"),
])  # fmt: skip
async def test_url_inputs_are_refused_at_once_when_they_can_be_judged_without_dns(setup, body, status, expect):
    async with setup.client() as c:
        resp = await c.post("/generate", json=body)
    assert resp.status_code == status and expect in resp.json()["error"], resp.text
    assert setup.fake.submitted == []
    assert list(setup.fake.root.iterdir()) == []  # nothing left behind


async def test_an_input_is_a_file_or_a_url_not_both(setup, media):
    async with setup.client() as c:
        resp = await c.post("/generate", files=_files(media), data={"video_url": "https://b.example/a.mp4"})
        assert resp.status_code == 400 and "not both" in resp.json()["error"]
        resp = await c.post("/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "object of job parameters" in resp.json()["error"]
        resp = await c.post("/generate", content=b"{nope", headers={"content-type": "application/json"})
        assert resp.status_code == 400 and "Malformed JSON" in resp.json()["error"]
    assert setup.fake.submitted == []


# --------------------------------------------------------------------------- webhooks at admission


async def test_webhook_url_needs_the_deployments_secret(tmp_path, media):
    urls = {"video_url": "https://b.example/a.mp4", "audio_url": "https://b.example/a.wav"}
    without = Setup(tmp_path / "a", secret="")
    try:
        async with without.client() as c:
            resp = await c.post("/generate", json={**urls, "webhook_url": "https://hooks.example/x"})
        assert resp.status_code == 400 and "LIP_SYNC_WEBHOOK_SECRET" in resp.json()["error"]
        assert without.fake.submitted == []
    finally:
        without.close()
    with_secret = Setup(tmp_path / "b")
    try:
        async with with_secret.client() as c:
            resp = await c.post("/generate", json={**urls, "webhook_url": "https://hooks.example/x",
                                                   "webhook_events": ["started", "completed"]})
            assert resp.status_code == 202, resp.text
            resp = await c.post("/generate", json={**urls, "webhook_url": "http://192.168.1.1/hook"})
            assert resp.status_code == 400 and "private address" in resp.json()["error"]
        assert with_secret.fake.submitted[0]["params"].webhook_url == "https://hooks.example/x"
    finally:
        with_secret.close()


# --------------------------------------------------------------------------- Idempotency-Key


async def test_a_retry_with_the_same_key_gets_the_original_job(setup, media):
    async with setup.client() as c:
        first = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "order-1"})
        again = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
        assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["job_id"] == first.json()["job_id"] and len(setup.fake.submitted) == 1
        assert len(list((setup.integration.scratch_dir).iterdir())) == 0  # the replay's body is not kept

        other = await c.post("/generate", files=_files(media), data={"bbox_shift": "4"},
                             headers={"Idempotency-Key": "order-1"})
        assert other.status_code == 409 and "different request" in other.json()["error"]
        other = await c.post("/generate", files=_files(media, audio="av", audio_name="speech.mp4"),
                             headers={"Idempotency-Key": "order-1"})
        assert other.status_code == 409  # other bytes, same parameters: another request
        fresh = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "order-2"})
        assert fresh.status_code == 202 and fresh.json()["job_id"] != first.json()["job_id"]
        bad = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "x" * 300})
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]
    assert len(setup.fake.submitted) == 2


async def test_while_the_first_upload_runs_a_second_post_with_its_key_is_told_to_retry(setup, media):
    """The key is reserved before the body is read: the loser does not upload, it gets 409 + Retry-After."""
    video, audio = media["video"].read_bytes(), media["audio"].read_bytes()
    held = asyncio.Event()
    boundary = "b0undary"

    async def slow_body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="clip.mp4"\r\n'
               "Content-Type: video/mp4\r\n\r\n").encode() + video[:1000]
        await held.wait()
        yield video[1000:] + (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="audio"; '
                              'filename="a.wav"\r\n\r\n').encode() + audio + f"\r\n--{boundary}--\r\n".encode()

    headers = {"Idempotency-Key": "k-race", "content-type": f"multipart/form-data; boundary={boundary}"}
    async with setup.client() as c:
        winner = asyncio.create_task(c.post("/generate", content=slow_body(), headers=headers))
        for _ in range(200):
            if setup.fake.new_upload_calls:
                break
            await asyncio.sleep(0.01)
        loser = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "k-race"})
        assert loser.status_code == 409 and int(loser.headers["Retry-After"]) >= 1
        assert "still being received" in loser.json()["error"]
        assert setup.fake.new_upload_calls == 1  # the loser took no job slot and wrote nothing
        held.set()
        first = await winner
        assert first.status_code == 202, first.text
        retry = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "k-race"})
        assert retry.status_code == 200 and retry.json()["job_id"] == first.json()["job_id"]


async def test_a_refused_request_frees_its_key(setup, media):
    async with setup.client() as c:
        bad = await c.post("/generate", files=_files(media, video="text"), headers={"Idempotency-Key": "k"})
        assert bad.status_code == 400
        good = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "k"})
        assert good.status_code == 202  # not a 409: the failed request did not keep the key


async def test_without_an_integration_a_key_is_refused_not_ignored(tmp_path, media):
    (tmp_path / "jobs").mkdir()
    fake = FakeManager(tmp_path / "jobs")
    app = create_rest_app(fake, _health, ApiLimits())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.post("/generate", files=_files(media), headers={"Idempotency-Key": "k"})
    assert resp.status_code == 400 and "not supported" in resp.json()["error"] and fake.submitted == []


# --------------------------------------------------------------------------- status and usage


async def test_queued_jobs_show_their_position_and_an_eta_once_there_is_history(setup, media):
    async with setup.client() as c:
        ids = [(await c.post("/generate", files=_files(media))).json()["job_id"] for _ in range(3)]
        first = (await c.get(f"/status/{ids[0]}")).json()
        assert first["queue_position"] == 1 and first["eta_s"] is None  # no finished job yet: no guess
        assert first["webhooks"] is None
        # one job done in 10 s (timings of a real record): the queue behind one worker is 10 s per job
        done = setup.fake.jobs[ids[0]]
        setup.fake.jobs[ids[0]] = done.model_copy(update={
            "status": JobStatus.completed, "timings": {"queue_s": 1.0, "total_s": 11.0}, "frames": None})
        setup.integration._estimates(refresh=True)
        second, third = [(await c.get(f"/status/{i}")).json() for i in ids[1:]]
    assert (second["queue_position"], third["queue_position"]) == (1, 2)
    assert (second["eta_s"], third["eta_s"]) == (10.0, 20.0)


async def test_usage_is_the_callers_own(tmp_path):
    auth = AuthSettings(api_tokens="tok-a,tok-b", scope_jobs_to_token=True)
    s = Setup(tmp_path, wrap=lambda app: BearerAuthMiddleware(app, auth))
    try:
        day = datetime(2026, 3, 2, 10, tzinfo=timezone.utc)
        for i, (token, status) in enumerate([("tok-a", "completed"), ("tok-a", "failed"), ("tok-b", "completed")]):
            s.integration.ledger.record(UsageEntry(f"job-{i}", owner_of(token), JobStatus(status), day,
                                                   4.0 if status == "completed" else 0.0, 100))
        async with s.client(Authorization="Bearer tok-a") as c:
            mine = (await c.get("/usage", params={"since": "2026-03-01", "until": "2026-03-31"})).json()
            bad = await c.get("/usage", params={"since": "2026-03-31", "until": "2026-03-01"})
            too_long = await c.get("/usage", params={"since": "2024-01-01", "until": "2026-03-01"})
        async with s.client() as c:
            anonymous = await c.get("/usage")
        assert (mine["jobs"], mine["completed"], mine["failed"], mine["output_seconds"]) == (2, 1, 1, 4.0)
        assert [d["date"] for d in mine["days"]] == ["2026-03-02"]
        assert bad.status_code == 400 and too_long.status_code == 400
        assert anonymous.status_code == 401
    finally:
        s.close()


# --------------------------------------------------------------------------- job events


class Executor:
    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, ctx) -> JobOutcome:
        ctx.progress("generate", 0.5)
        time.sleep(0.6)  # past the manager's progress-write interval: a second progress is written
        ctx.progress("generate", 0.9)
        if ctx.job.video_filename == "block.mp4":
            self.release.wait(10)
            raise InvalidInputError("no face")
        out = ctx.work_dir / "output.mp4"
        out.write_bytes(b"mp4")
        return JobOutcome(output_file=out.name, frames=50, timings={"generate": 0.5})


def submit(manager: JobManager, name: str = "face.mp4", **fields) -> JobRecord:
    job_id, job_dir = manager.new_upload()
    (job_dir / "input_video.mp4").write_bytes(b"v")
    (job_dir / "input_audio.wav").write_bytes(b"a")
    return manager.submit(job_id, video_file="input_video.mp4", audio_file="input_audio.wav", video_filename=name,
                          audio_filename="speech.wav", params=parse_fields(fields), owner="owner-1",
                          media={"video": {"fps": "25/1"}, "audio": {"duration_s": 2.0}})


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


def test_job_events_feed_webhooks_usage_and_logs(tmp_path):
    """The manager's one hook: started, progress, the end, removal -- outbox rows, ledger rows, a clean slate."""
    seen: list[tuple[str, str]] = []
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    integration = Integration(tmp_path, records=store, download_url=DOWNLOAD_URL, workers=1, policy=LOOPBACK_OK,
                              webhooks=WebhookSettings(webhook_secret=SECRET, webhook_progress_interval_s=0))
    integration.dispatcher = None  # deliveries stay in the outbox, to be looked at

    def on_event(job_id: str, event: str) -> None:
        seen.append((job_id, event))
        integration.on_job_event(job_id, event)

    manager = JobManager(store, JobFiles(tmp_path), Executor(), workers=1, on_event=on_event)
    manager.start()
    hook = {"webhook_url": "http://127.0.0.1:9/hook"}
    try:
        job = submit(manager, "block.mp4", **hook, webhook_events="started,progress,failed")
        progress = wait_for(lambda: [json.loads(r.body) for r in integration.outbox.for_job(job.job_id)
                                     if r.event.value == "progress" and json.loads(r.body)["progress"] == 0.9])
        assert len(progress) == 1  # the newer progress replaced the one not yet delivered
        assert [e for j, e in seen if j == job.job_id][:2] == ["started", "progress"]
        waiting = submit(manager, **hook, webhook_events="cancelled")  # behind the running job
        manager.cancel(waiting.job_id)  # cancelled while queued: no worker involved
        assert [json.loads(r.body)["event"] for r in integration.outbox.for_job(waiting.job_id)] == ["cancelled"]

        manager._execute.release.set()
        plain = submit(manager)
        wait_for(lambda: manager.get(plain.job_id).status is JobStatus.completed)
        bodies = [json.loads(r.body) for r in integration.outbox.for_job(job.job_id)]
        # the job's end drops its undelivered progress: the end says more
        assert [(b["event"], b["status"]) for b in bodies] == [("started", "processing"), ("failed", "failed")]
        assert integration.outbox.for_job(plain.job_id) == []  # no webhook_url: nothing to send
        usage = integration.ledger.summary("owner-1", utcnow().date(), utcnow().date())
        assert (usage.jobs, usage.completed, usage.failed, usage.cancelled) == (3, 1, 1, 1)
        assert (usage.frames, usage.output_seconds) == (50, 2.0)  # 50 frames at 25 fps

        manager.cleanup(job.job_id)
        assert (job.job_id, "removed") in seen and integration.outbox.for_job(job.job_id) == []
    finally:
        manager._execute.release.set()
        manager.close()
        integration.stop()


def test_a_job_failed_by_recovery_is_an_event_too(tmp_path):
    before = JobManager(SQLiteJobStore(tmp_path / "jobs.sqlite3"), JobFiles(tmp_path), Executor(), workers=1)
    job_id, job_dir = before.new_upload()
    (job_dir / "v.mp4").write_bytes(b"v")
    (job_dir / "a.wav").write_bytes(b"a")
    before.submit(job_id, video_file="v.mp4", audio_file="a.wav", video_filename="v.mp4", audio_filename="a.wav",
                  params=parse_fields({}))
    before.store.update(job_id, status=JobStatus.processing, attempts=1)  # a crash mid-job, out of attempts
    before.close()
    seen: list[tuple[str, str]] = []
    after = JobManager(SQLiteJobStore(tmp_path / "jobs.sqlite3"), JobFiles(tmp_path), Executor(), workers=1,
                       max_attempts=1, on_event=lambda j, e: seen.append((j, e)))
    after.start()
    try:
        assert seen == [(job_id, "failed")] and after.get(job_id).status is JobStatus.failed
    finally:
        after.close()


def test_output_seconds_come_from_frames_and_fps():
    record = JobRecord(job_id="j", status=JobStatus.completed, frames=75, video_filename="v", audio_filename="a",
                       video_file="v", audio_file="a", media={"video": {"fps": "30000/1001"}})
    assert output_seconds(record) == round(75 * 1001 / 30000, 3)
    from fractions import Fraction
    assert output_seconds(record, Fraction(25)) == 3.0  # the worker's word wins
    assert output_seconds(record.model_copy(update={"status": JobStatus.failed})) == 0.0


# --------------------------------------------------------------------------- the worker's fetch step


def test_the_worker_fetches_url_inputs_and_checks_them_like_uploads(tmp_path, media):
    limits = ApiLimits(max_video_seconds=5)
    with LoopbackServer() as files:
        files.routes["/clip.mp4"] = lambda req: Reply(200, {"Content-Type": "video/mp4"}, media["video"].read_bytes())
        files.routes["/notes"] = lambda req: Reply(200, {}, media["text"].read_bytes())
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        (job_dir / "input_audio.wav").write_bytes(media["audio"].read_bytes())
        (job_dir / "input_video.url.json").write_text("{}")
        record = JobRecord(job_id="j", params=parse_fields({"video_url": files.url("/clip.mp4")}),
                           video_filename="clip.mp4", audio_filename="a.wav", video_file="input_video.url.json",
                           audio_file="input_audio.wav")
        ready = prepare_inputs(record, job_dir, limits, validate=validate_media, policy=LOOPBACK_OK)
        assert ready.video == job_dir / "input_video.mp4" and ready.video_info.width == 64
        assert read_reference(job_dir / "input_video.url.json")["file"] == "input_video.mp4"

        not_media = record.model_copy(update={"params": parse_fields({"video_url": files.url("/notes")})})
        with pytest.raises(InvalidInputError) as refused:
            prepare_inputs(not_media, job_dir, limits, validate=validate_media, policy=LOOPBACK_OK)
        assert "video_url (notes)" in refused.value.message and "input_video" not in refused.value.message
        with pytest.raises(InputTooLargeError, match="video_url: the video is larger"):
            prepare_inputs(record, job_dir, ApiLimits(max_video_bytes=1000), validate=validate_media,
                           policy=LOOPBACK_OK)
        asked = len(files.paths())
        # the deployment's policy (no allow-list): loopback is refused by the worker, never asked
        with pytest.raises(InvalidInputError, match="loopback"):
            prepare_inputs(record, job_dir, limits, validate=validate_media, policy=AddressPolicy())
        assert len(files.paths()) == asked


# --------------------------------------------------------------------------- command lines and the page


def test_service_only_parameters_stay_off_the_local_command_line():
    from lipsync_client.cli import build_parser as client_parser
    from lipsync_runner.cli import _parser as local_parser
    from lipsync_runner.config import RunnerSettings

    def options(parser, command):
        sub = parser._subparsers._group_actions[0].choices[command]
        return {opt for a in sub._actions for opt in a.option_strings}

    local, remote = options(local_parser(RunnerSettings()), "generate"), options(client_parser(), "generate")
    service_only = {"--video-url", "--audio-url", "--webhook-url", "--webhook-events"}
    assert "--bbox-shift" in local and not local & service_only
    assert service_only | {"--bbox-shift", "--idempotency-key"} <= remote


def test_the_page_shows_queue_position_and_eta():
    """queueText of ui/static/app.js, run in node (the page's own code, not a copy)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    source = (ROOT / "lipsync_runner/ui/static/app.js").read_text()
    match = re.search(r"^function queueText\(st\) \{.*?^\}", source, re.S | re.M)
    assert match, "queueText is gone from app.js"
    assert "queueText(st)" in source[source.index("function renderStatus"):]
    script = match.group(0) + """
const cases = [
  {status: "queued", queue_position: 1, eta_s: null},
  {status: "queued", queue_position: 3, eta_s: 125},
  {status: "processing", queue_position: null, eta_s: 42.4},
  {status: "processing"},
];
console.log(JSON.stringify(cases.map(queueText)));
"""
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(out) == [" · next in line", " · 3 in line · about 2 min left", " · about 42 s left", ""]



# --------------------------------------------------------------------------- the SDK and the lipsync CLI


class FakeService:
    """An httpx MockTransport answering like the service: generate, status (queued, then done), usage."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.in_progress = 1  # the first keyed generate is told the key is still being received
        self.polls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        path = request.url.path
        if path.endswith("/generate"):
            if request.headers.get("Idempotency-Key") and self.in_progress:
                self.in_progress -= 1
                return httpx.Response(409, json={"error": "still being received"}, headers={"Retry-After": "1"})
            return httpx.Response(202, json={"job_id": "j1", "status": "queued"})
        if path.endswith("/status/j1"):
            self.polls += 1
            if self.polls == 1:
                return httpx.Response(200, json={"job_id": "j1", "status": "queued", "queue_position": 2,
                                                 "eta_s": 130.0})
            return httpx.Response(200, json={"job_id": "j1", "status": "completed", "progress": 1.0, "webhooks": [
                {"event": "completed", "event_id": "e1", "state": "delivered", "attempts": 3, "last_status": 200}]})
        if path.endswith("/download/j1"):
            return httpx.Response(200, content=b"mp4", headers={"content-length": "3"})
        if path.endswith("/usage"):
            return httpx.Response(200, json={"since": request.url.params["since"], "until": "2026-03-31", "jobs": 2,
                                             "completed": 2, "output_seconds": 8.5, "frames": 212, "days": []})
        return httpx.Response(404, json={"error": "Not found"})


def test_the_sdk_sends_url_inputs_as_json_with_the_key_and_retries_while_in_progress(monkeypatch):
    from lipsync_client import IdempotencyConflict, LipSyncClient
    from lipsync_client import _core

    monkeypatch.setattr(_core.time, "sleep", lambda s: None, raising=False)
    service = FakeService()
    with LipSyncClient("http://t", transport=httpx.MockTransport(service)) as client:
        client._core.retry_backoff = 0
        job = client.generate(video_url="https://b.example/in.mp4", audio_url="https://b.example/fr.wav",
                              webhook_url="https://me.example/hook", webhook_events=["completed"],
                              idempotency_key="order-1")
        assert job.job_id == "j1"
        first, retried = service.requests[:2]
        assert first.headers["content-type"] == "application/json" and first.headers["Idempotency-Key"] == "order-1"
        assert json.loads(first.content) == {"video_url": "https://b.example/in.mp4",
                                             "audio_url": "https://b.example/fr.wav",
                                             "webhook_url": "https://me.example/hook",
                                             "webhook_events": ["completed"]}
        assert retried.content == first.content  # the same request again, after the server's Retry-After
        assert client.status("j1").queue_position == 2
        assert client.status("j1").webhooks[0].state == "delivered"
        assert client.usage(since="2026-03-01").output_seconds == 8.5
        assert service.requests[-1].url.params["since"] == "2026-03-01"
        with pytest.raises(ValueError, match="audio: give a file or audio_url"):
            client.generate(video_url="https://b.example/in.mp4")
    conflict_transport = httpx.MockTransport(
        lambda r: httpx.Response(409, json={"error": "used for a different request"}))
    with LipSyncClient("http://t", transport=conflict_transport) as client:
        with pytest.raises(IdempotencyConflict, match="different request"):
            client.generate(video_url="https://b/a.mp4", audio_url="https://b/a.wav", idempotency_key="k")


def test_the_lipsync_cli_takes_urls_a_key_and_shows_the_queue(tmp_path, capsys, monkeypatch):
    from lipsync_client import LipSyncClient
    from lipsync_client import cli

    monkeypatch.setattr(cli.LipSyncClient, "wait", lambda self, job_id, progress=None, timeout=None: (
        progress(self.status(job_id)), self.status(job_id))[1])
    service = FakeService()
    speech = tmp_path / "fr.wav"
    speech.write_bytes(b"RIFF")
    args = cli.build_parser().parse_args(["generate", "--video-url", "https://b.example/in.mp4", str(speech),
                                          "--idempotency-key", "order-9", "-o", str(tmp_path / "out.mp4")])
    shown: list[str] = []
    monkeypatch.setattr(cli.JobProgress, "__call__", lambda self, job: shown.append(cli.job_line(job)))
    with LipSyncClient("http://t", transport=httpx.MockTransport(service)) as client:
        assert args.func(client, args) == cli.OK
    sent = [r for r in service.requests if r.url.path.endswith("/generate")][-1]
    assert sent.headers["Idempotency-Key"] == "order-9" and b'name="video_url"' in sent.content
    assert b'name="audio"; filename="fr.wav"' in sent.content and b'name="video";' not in sent.content
    assert shown == ["queued (position 2, about 2 min left)"]
    assert (tmp_path / "out.mp4").read_bytes() == b"mp4"
    # neither a file nor a URL for an input: a usage error (exit 2) before any request
    assert cli.main(["generate", "--server", "http://127.0.0.1:9", str(speech)]) == cli.BAD_INPUT
    assert "give the audio as a file or with --audio-url" in capsys.readouterr().err
