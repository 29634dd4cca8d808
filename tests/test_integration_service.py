"""Issue 14 end to end: the real server (`bentoml serve service:LipSync`, tiny models), a real webhook
receiver and a real file server on the loopback.

* webhooks arrive signed (checked with the SDK's `verify_webhook`), are retried after the
  receiver fails twice, and still arrive after the server is SIGKILLed and restarted between
  the job's end and the delivery;
* URL inputs from an allow-listed loopback file server make a job; a name that resolves to
  loopback is refused by the worker (the job fails), an IP literal by admission (400);
* two concurrent POSTs with one Idempotency-Key create one job (both surfaces);
* usage, queue fields and the JSON log lines of the same jobs.

One server for the module (the restart test is last: it replaces it).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lipsync_client import LipSyncClient, verify_webhook

from .loopback_http import LoopbackServer, Reply, Request
from .server import start_server, stop_server

API = "/api/lip-sync"
SECRET = "whsec_e2e_5b1c"


class Receiver:
    """The customer's webhook endpoint: answers each delivery from a script, records every attempt."""

    def __init__(self, server: LoopbackServer) -> None:
        self.server = server
        self.script: dict[tuple[str, str], list[int]] = {}  # (path, event) -> statuses to answer, then 200
        server.routes["/hooks/a"] = server.routes["/hooks/b"] = self.answer

    def answer(self, req: Request) -> Reply:
        statuses = self.script.get((req.path, req.headers.get("lipsync-event", "")), [])
        return Reply(statuses.pop(0) if statuses else 200, body=b"ok")

    def deliveries(self, path: str) -> list[Request]:
        return [r for r in list(self.server.requests) if r.path == path and r.method == "POST"]


@pytest.fixture(scope="module")
def loopback():
    with LoopbackServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def receiver(loopback) -> Receiver:
    return Receiver(loopback)


@pytest.fixture(scope="module")
def files(loopback, media_dir):
    loopback.routes["/bucket/face.mp4"] = lambda req: Reply(200, {"Content-Type": "video/mp4"},
                                                            (media_dir / "face.mp4").read_bytes())
    loopback.routes["/bucket/speech"] = lambda req: Reply(200, {"Content-Type": "audio/wav"},
                                                          (media_dir / "speech_short.wav").read_bytes())
    return loopback


@pytest.fixture(scope="module")
def service(tmp_path_factory, models_dir):
    workdir = tmp_path_factory.mktemp("integration-server")
    env = {"LIP_SYNC_WEBHOOK_SECRET": SECRET, "LIP_SYNC_URL_ALLOWLIST": "127.0.0.1",
           "LIP_SYNC_WEBHOOK_RETRY_FIRST_S": "0.5", "LIP_SYNC_WEBHOOK_TIMEOUT_S": "5",
           "LIP_SYNC_LOG_FORMAT": "json", "LIP_SYNC_JOB_WORKERS": "2"}
    state = {"server": start_server(workdir, models_dir, **env), "workdir": workdir, "env": env,
             "models_dir": models_dir}
    yield state
    stop_server(state["server"])


@pytest.fixture
def api(service) -> httpx.Client:
    with httpx.Client(base_url=service["server"].url, timeout=120) as c:
        yield c


def wait_for(predicate, timeout: float = 240, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def finished(api: httpx.Client, job_id: str) -> dict:
    def done():
        body = api.get(f"{API}/status/{job_id}").json()
        return body if body["status"] in ("completed", "failed", "cancelled") else None
    return wait_for(done)


def verified(delivery: Request) -> dict:
    return verify_webhook(delivery.body, delivery.headers["lipsync-signature"], SECRET)


def url_job(files: LoopbackServer, **fields) -> dict:
    return {"video_url": files.url("/bucket/face.mp4"), "audio_url": files.url("/bucket/speech"), **fields}


# ------------------------------------------------------------------ URL inputs and webhooks


def test_a_url_job_sends_a_signed_webhook_retried_after_two_failures(api, files, receiver, service):
    receiver.script["/hooks/a", "completed"] = [500, 503]
    resp = api.post(f"{API}/generate", json=url_job(files, webhook_url=receiver.server.url("/hooks/a"),
                                                    webhook_events=["started", "completed"]))
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    status = finished(api, job_id)
    assert status["status"] == "completed", status
    assert status["inputs"]["video_source"] == "url" and status["inputs"]["video_filename"] == "face.mp4"
    assert api.get(f"{API}/jobs/{job_id}/inputs/video").status_code == 200  # the fetched file plays back

    def completed_attempts():
        got = [d for d in receiver.deliveries("/hooks/a") if d.headers["lipsync-event"] == "completed"]
        return got if len(got) >= 3 else None

    attempts = wait_for(completed_attempts, timeout=60)
    assert [d.headers["lipsync-attempt"] for d in attempts] == ["1", "2", "3"]
    assert len({d.headers["lipsync-event-id"] for d in attempts}) == 1  # one delivery, retried
    assert [d.body for d in attempts][0] == attempts[2].body  # the same frozen body each time
    event = verified(attempts[2])
    assert (event["event"], event["job_id"], event["status"]) == ("completed", job_id, "completed")
    assert attempts[1].at - attempts[0].at >= 0.3  # backed off, not hammered
    started = [d for d in receiver.deliveries("/hooks/a") if d.headers["lipsync-event"] == "started"]
    assert len(started) == 1 and verified(started[0])["status"] == "processing"

    hooks = wait_for(lambda: [h for h in api.get(f"{API}/status/{job_id}").json()["webhooks"]
                              if h["event"] == "completed" and h["state"] == "delivered"], timeout=30)
    assert (hooks[0]["attempts"], hooks[0]["last_status"]) == (3, 200)

    # the same job in the owner's usage (frames at the result's rate), on both surfaces
    usage = api.get(f"{API}/usage").json()
    assert usage["completed"] >= 1 and usage["frames"] >= status["frames"] > 0
    assert usage["output_seconds"] >= round(status["frames"] / 25, 3)
    assert api.post("/usage", json={}).json() == api.get(f"{API}/usage").json()
    # and in the JSON log: one object per line, with the job's id and durations, no secret
    lines = [json.loads(line) for line in service["server"].log.read_text().splitlines() if line.startswith("{")]
    ends = [line for line in lines if line.get("event") == "completed" and line.get("job_id") == job_id]
    assert ends and "durations_s" in ends[0] and SECRET not in service["server"].log.read_text()


def test_url_inputs_that_reach_loopback_without_the_allowlist_are_refused(api, files, service):
    import bentoml

    # a name that resolves to loopback: only the worker's lookup can tell; the job fails, nothing is fetched.
    # Sent through BentoML's own client: generate without files is a JSON body on that surface
    before = len(files.requests)
    with bentoml.SyncHTTPClient(service["server"].url, timeout=60) as bento:
        job = bento.generate(video_url=files.url("/bucket/face.mp4", host="localhost"),
                             audio_url=files.url("/bucket/speech"))
    assert job["status"] == "queued", job
    status = finished(api, job["job_id"])
    assert status["status"] == "failed" and "localhost refused: it cannot be reached from this service" in status["error"], status
    assert [r.path for r in files.requests[before:]].count("/bucket/face.mp4") == 0
    # an address literal is refused by admission, at once
    resp = api.post(f"{API}/generate", json=url_job(files, video_url="http://127.0.0.9/face.mp4"))
    assert resp.status_code == 400 and "loopback address" in resp.json()["error"]


# ------------------------------------------------------------------ idempotency


def test_two_concurrent_posts_with_one_key_create_one_job(api, media_dir, service):
    video, audio = (media_dir / "face.mp4").read_bytes(), (media_dir / "speech_short.wav").read_bytes()
    boundary = "idem-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="video"; filename="face.mp4"\r\n'
            "Content-Type: video/mp4\r\n\r\n").encode()
    tail = (f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="speech.wav"\r\n\r\n'
            ).encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    release = threading.Event()

    def slow_body():
        yield head + video[:4096]
        release.wait(60)
        yield video[4096:] + tail

    headers = {"Idempotency-Key": "dub-42-fr", "content-type": f"multipart/form-data; boundary={boundary}"}
    jobs_before = api.get(f"{API}/jobs").json()["total"]
    jobs_dir = service["server"].data_dir / "jobs"
    dirs_before = set(jobs_dir.iterdir())
    answers: dict[str, httpx.Response] = {}
    first = threading.Thread(target=lambda: answers.update(
        first=httpx.post(service["server"].url + f"{API}/generate", content=slow_body(), headers=headers,
                         timeout=120)))
    first.start()
    try:
        # the first is receiving its body (its job directory exists: the key was reserved before it)
        wait_for(lambda: set(jobs_dir.iterdir()) - dirs_before, timeout=60, interval=0.05)
        second = api.post(f"{API}/generate", content=head + video + tail, headers=headers)
    finally:
        release.set()
        first.join(120)
    # the second came while the first was still uploading: told to come back (its body was not taken)
    assert second.status_code == 409 and int(second.headers["Retry-After"]) >= 1, second.text
    assert "still being received" in second.json()["error"]
    assert answers["first"].status_code == 202, answers["first"].text
    job_id = answers["first"].json()["job_id"]
    # now the retry gets the original job: over REST, over BentoML's route, through the SDK
    replay = api.post(f"{API}/generate", content=head + video + tail, headers=headers)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    bento = api.post("/generate", content=head + video + tail, headers=headers)
    assert bento.status_code == 200 and bento.json()["job_id"] == replay.json()["job_id"] == job_id
    with LipSyncClient(service["server"].url) as sdk:
        assert sdk.generate(media_dir / "face.mp4", media_dir / "speech_short.wav",
                            idempotency_key="dub-42-fr").job_id == job_id
    conflict = api.post(f"{API}/generate", files={"video": ("face.mp4", video), "audio": ("s.wav", audio)},
                        data={"bbox_shift": "7"}, headers={"Idempotency-Key": "dub-42-fr"})
    assert conflict.status_code == 409 and "different request" in conflict.json()["error"]
    assert api.get(f"{API}/jobs").json()["total"] == jobs_before + 1


# ------------------------------------------------------------------ a restart between the end and the delivery (last)


def test_a_pending_webhook_is_delivered_after_a_sigkill_and_a_restart(api, files, receiver, service):
    receiver.script["/hooks/b", "failed"] = [500] * 1000  # down until further notice
    # a job that ends at once (its video URL is refused by the worker): its "failed" event is the delivery
    resp = api.post(f"{API}/generate", json=url_job(files, video_url=files.url("/bucket/face.mp4", host="localhost"),
                                                    webhook_url=receiver.server.url("/hooks/b")))
    job_id = resp.json()["job_id"]
    assert finished(api, job_id)["status"] == "failed"
    # the job has ended and its delivery failed at least once (recorded): now the server dies
    wait_for(lambda: any(h["attempts"] >= 1 for h in api.get(f"{API}/status/{job_id}").json()["webhooks"]),
             timeout=60)
    service["server"].kill()
    refused = receiver.deliveries("/hooks/b")
    event_id = refused[0].headers["lipsync-event-id"]
    receiver.script["/hooks/b", "failed"] = []  # the receiver is back

    service["server"] = start_server(service["workdir"], service["models_dir"], **service["env"])
    delivered = wait_for(lambda: receiver.deliveries("/hooks/b")[len(refused):], timeout=120)
    event = verified(delivered[0])
    assert (event["job_id"], event["event"], delivered[0].headers["lipsync-event-id"]) == (job_id, "failed", event_id)
    assert event["status"] == "failed" and "cannot be reached" in event["error"]
    with httpx.Client(base_url=service["server"].url, timeout=60) as after:
        hooks = wait_for(lambda: after.get(f"{API}/status/{job_id}").json()["webhooks"][0]["state"] == "delivered"
                         and after.get(f"{API}/status/{job_id}").json()["webhooks"], timeout=30)
    assert hooks[0]["attempts"] == len(refused) + 1 and hooks[0]["last_status"] == 200

