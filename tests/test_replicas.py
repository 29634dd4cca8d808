"""Scaled out for real: two LipSync API processes and one MuseTalkRunner process, deployed apart,
on one PostgreSQL server and one S3 bucket (tiny models on the CPU).

Each process is started the way deploy/kubernetes starts its pods: ``start-http-server`` on the
service file with ``--service-name``; the API finds the runner through BentoML's dependency
mapping (``--depends MuseTalkRunner=<url>``), not by starting one of its own. The replicas share
nothing else: each has its own local data directory (scratch only).

One module-scoped setup serves every check below, in order (they build on each other).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest

from lipsync_runner.media.ffmpeg import probe_video

from .backends import fleet_env, start_bento, wait_ready
from .server import Server, stop_server

API = "/api/lip-sync"
LEASE_S = 3


@dataclass
class Fleet:
    runner: Server
    a: Server
    b: Server
    db_url: str
    s3: object
    bucket: str
    workdir: Path
    env: dict[str, str]
    api_args: list[str]
    extra: list[Server] = field(default_factory=list)
    last_job: str = ""

    def replica_of(self, lease_owner: str) -> Server:
        """The API server whose worker process wrote this lease owner ("<host>:<pid>:<random>")."""
        pid = int(lease_owner.split(":")[1])
        for server in (self.a, self.b, *self.extra):
            if pid in {p.pid for p in server.processes()}:
                return server
        raise AssertionError(f"no replica has pid {pid}")

    def replica_of_or_none(self, lease_owner: str) -> Server | None:
        try:
            return self.replica_of(lease_owner)
        except AssertionError:
            return None  # the killed replica's lease, not yet taken over

    def record(self, job_id: str) -> dict:
        with psycopg.connect(self.db_url) as conn:
            return conn.execute("SELECT body FROM lipsync_jobs WHERE job_id = %s", (job_id,)).fetchone()[0]

    def keys(self, job_id: str = "") -> list[str]:
        return self.s3.keys(self.bucket, f"fleet/jobs/{job_id}")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Small inputs: the face clip at 160x120; 0.4 s of speech (10 frames) and 1.6 s (40 frames)."""
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    root = tmp_path_factory.mktemp("fleet-media")
    write_face_video(root / "face.mp4", seconds=1.0, size=(160, 120))
    write_speech_like_audio(root / "short.wav", seconds=0.4)
    write_speech_like_audio(root / "long.wav", seconds=1.6)
    return root


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, models_dir, postgres, s3) -> Fleet:
    workdir = tmp_path_factory.mktemp("fleet")
    db_url = postgres.create_database()
    bucket = s3.create_bucket()
    env = fleet_env(workdir, models_dir, db_url, f"s3://{bucket}/fleet", s3.endpoint_url,
                    LIP_SYNC_LEASE_S=str(LEASE_S), LIP_SYNC_QUEUE_POLL_S="0.3")
    runner = start_bento(workdir, "runner", ["--service-name", "MuseTalkRunner"], env)
    api_args = ["--service-name", "LipSync", "--depends", f"MuseTalkRunner={runner.url}"]
    a = start_bento(workdir, "api-a", api_args, env)
    b = start_bento(workdir, "api-b", api_args, env)
    fleet = Fleet(runner, a, b, db_url, s3, bucket, workdir, env, api_args)
    try:
        for server in (runner, a, b):
            wait_ready(server)
        yield fleet
    finally:
        for server in (a, b, *fleet.extra, runner):
            stop_server(server)


def submit(server: Server, media: Path, audio: str = "short.wav") -> str:
    with (media / "face.mp4").open("rb") as v, (media / audio).open("rb") as w:
        r = httpx.post(f"{server.url}{API}/generate", timeout=120,
                       files={"video": ("face.mp4", v, "video/mp4"), "audio": (audio, w, "audio/wav")})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def status(server: Server, job_id: str) -> dict:
    r = httpx.get(f"{server.url}{API}/status/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(server: Server, job_id: str, statuses=("completed", "failed", "cancelled"), timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = status(server, job_id)
        if body["status"] in statuses:
            return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {body['status']} ({body['stage']}) after {timeout} s")


def wait_until_at_work(fleet: Fleet, job_id: str, timeout: float = 120) -> dict:
    """The job's record once a worker has claimed it and begun (read from the database: faster than
    asking a busy replica)."""
    deadline = time.monotonic() + timeout
    while (rec := fleet.record(job_id))["status"] != "processing" or rec["stage"] == "starting":
        assert rec["status"] in ("queued", "processing") and time.monotonic() < deadline, rec
        time.sleep(0.05)
    return rec


# ----------------------------------------------------------------------------------------------



def job_files(fleet, job_id: str) -> list[str]:
    """A job's files in the bucket, beside its progressive output (live.m3u8 and its segments, published
    to the bucket as they are made: test_progressive.py), which every finished job also has."""
    names = sorted(k.rsplit("/", 1)[1] for k in fleet.keys(job_id))
    assert "live.m3u8" in names, names
    return [n for n in names if not n.startswith("live")]

def test_the_api_reaches_the_runner_through_the_dependency_mapping(fleet):
    for api in (fleet.a, fleet.b):
        body = httpx.get(f"{api.url}{API}/health", timeout=30).json()
        assert body["models_loaded"] is True and body["model_version"] == "v15"
        # the API did not start a runner of its own: one worker process, the LipSync service
        workers = [" ".join(p.cmdline()) for p in api.processes()[1:]]
        assert workers and all("MuseTalkRunner" not in w for w in workers), workers
    # the runner runs as an inner service (it accepts the pickled arrays the API sends), so nothing
    # but the API may reach it: deploy/kubernetes gives it a NetworkPolicy
    assert httpx.post(f"{fleet.runner.url}/health", json={}, timeout=30).json()["models_loaded"] is True


def test_eight_jobs_submitted_to_one_replica_run_on_both_and_are_served_by_the_other(fleet, media, tmp_path):
    """All eight go to A (which runs two at a time): B lists them, polls them, runs some of them,
    downloads their results and cleans them up."""
    jobs = [submit(fleet.a, media) for _ in range(8)]
    listed = httpx.get(f"{fleet.b.url}{API}/jobs", params={"limit": 100}, timeout=30).json()
    assert set(jobs) <= {j["job_id"] for j in listed["jobs"]}
    for job_id in jobs:
        assert wait_for(fleet.b, job_id)["status"] == "completed"
    ran_on = {job_id: fleet.replica_of(fleet.record(job_id)["lease_owner"]).url for job_id in jobs}
    assert set(ran_on.values()) == {fleet.a.url, fleet.b.url}, ran_on

    ran_on_a = next(j for j, url in ran_on.items() if url == fleet.a.url)
    assert job_files(fleet, ran_on_a) == ["credentials.json", "input_audio.wav", "input_video.mp4", "output.mp4",
                                          "thumbnail.jpg"]
    whole = httpx.get(f"{fleet.b.url}{API}/download/{ran_on_a}", timeout=60)  # from the bucket, through B
    assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
    out = tmp_path / "out.mp4"
    out.write_bytes(whole.content)
    assert probe_video(out).frame_count_estimate == 10  # 0.4 s of speech at 25 fps
    part = httpx.get(f"{fleet.b.url}{API}/download/{ran_on_a}", headers={"Range": "bytes=8-15"}, timeout=60)
    assert part.status_code == 206 and part.content == whole.content[8:16]
    bento = httpx.post(f"{fleet.b.url}/download", json={"job_id": ran_on_a}, timeout=60)  # BentoML's surface
    assert bento.status_code == 200 and bento.content == whole.content
    # what the web page shows next to it: the thumbnail, and the uploaded video played by ranges
    thumb = httpx.get(f"{fleet.b.url}{API}/jobs/{ran_on_a}/thumbnail.jpg", timeout=30)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content.startswith(b"\xff\xd8")
    video = httpx.get(f"{fleet.b.url}{API}/jobs/{ran_on_a}/inputs/video", headers={"Range": "bytes=4-11"}, timeout=30)
    assert video.status_code == 206 and video.content == (media / "face.mp4").read_bytes()[4:12]
    assert video.headers["content-disposition"].startswith("inline")

    for job_id in jobs:
        assert httpx.delete(f"{fleet.b.url}{API}/cleanup/{job_id}", timeout=30).status_code == 200
        assert httpx.get(f"{fleet.a.url}{API}/status/{job_id}", timeout=30).status_code == 404
        assert fleet.keys(job_id) == []


def test_a_cancel_sent_to_one_replica_stops_the_job_running_on_the_other(fleet, media):
    job_id = submit(fleet.a, media, "long.wav")
    holder = fleet.replica_of(wait_until_at_work(fleet, job_id)["lease_owner"])
    other = fleet.b if holder is fleet.a else fleet.a
    answer = httpx.post(f"{other.url}{API}/cancel/{job_id}", timeout=30).json()
    assert answer["status"] in ("processing", "cancelled") and answer["stage"] in ("cancelling", "cancelled")
    start = time.monotonic()
    assert wait_for(holder, job_id, timeout=60)["status"] == "cancelled"
    assert time.monotonic() - start < 10  # a heartbeat (2 s at most) plus a chunk
    assert not any(k.endswith("output.mp4") for k in fleet.keys(job_id))


def test_sigkill_of_the_replica_running_a_job_lets_the_other_finish_it(fleet, media):
    job_id = submit(fleet.a, media)
    victim = fleet.replica_of(wait_until_at_work(fleet, job_id)["lease_owner"])
    survivor = fleet.b if victim is fleet.a else fleet.a
    victim.kill()  # mid-job, no shutdown hook runs
    # The survivor takes the job over once the lease lapses. Only then does the new pod of the
    # rolling restart below boot (the dead one is not replaced): started at once, it can boot within
    # the lease and claim the job itself, which is right too, but not what this test is about.
    deadline = time.monotonic() + 120
    while (owner := fleet.record(job_id)["lease_owner"]) is None or fleet.replica_of_or_none(owner) is not survivor:
        assert time.monotonic() < deadline, fleet.record(job_id)
        time.sleep(0.1)
    fleet.extra.append(start_bento(fleet.workdir, "api-c", fleet.api_args, fleet.env))

    done = wait_for(survivor, job_id, timeout=600)  # generous: a new replica boots meanwhile
    assert done["status"] == "completed" and done["attempts"] == 2, done
    assert fleet.replica_of(fleet.record(job_id)["lease_owner"]) is survivor
    assert job_files(fleet, job_id) == ["credentials.json", "input_audio.wav", "input_video.mp4", "output.mp4",
                                        "thumbnail.jpg"]  # one output
    uploads = fleet.s3.client().list_multipart_uploads(Bucket=fleet.bucket).get("Uploads", [])
    assert uploads == []
    with psycopg.connect(fleet.db_url) as conn:
        known = {j for (j,) in conn.execute("SELECT job_id FROM lipsync_jobs").fetchall()}
    assert {k.split("/")[2] for k in fleet.keys()} <= known  # no object without its job
    fleet.a, fleet.b = survivor, victim  # from here on: a is alive, b is the dead one
    fleet.last_job = job_id


def test_a_rolling_restart_during_a_stream_of_status_calls_fails_none(fleet):
    """Old replica out, new one in, while a client polls, in Kubernetes' order (deploy/kubernetes):
    the new pod joins the rotation once it is ready (readiness probe); the old pod, once terminating,
    keeps serving through its preStop pause while it leaves the rotation (endpoints lag behind),
    then gets SIGTERM and finishes what it has in flight. The client fails over only where a load
    balancer would: a refused connection goes to the next replica."""
    old, new = fleet.a, fleet.extra[0]  # the other replica died in the test above
    job_id = fleet.last_job
    rotation = [old]
    results: list[int | str] = []
    answered: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        i = 0
        while not stop.is_set():
            backends = list(rotation)  # the main thread changes the rotation meanwhile
            for attempt in range(len(backends)):
                server = backends[(i + attempt) % len(backends)]
                try:  # a new connection per call, as a proxy in front of the pods would open
                    r = httpx.get(f"{server.url}{API}/status/{job_id}", timeout=30,
                                  headers={"Connection": "close"})
                    results.append(r.status_code)
                    answered.append(server.url)
                    break
                except httpx.ConnectError:
                    continue  # that backend is gone: the next one
                except httpx.HTTPError as e:
                    results.append(type(e).__name__)
                    break
            else:
                results.append("no backend")
            i += 1
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        wait_ready(new)  # maxSurge 1, maxUnavailable 0: the new pod is ready before the old one goes
        rotation.append(new)
        time.sleep(1.0)
        # the old pod is terminating: its preStop pause runs while the endpoints drop it
        time.sleep(0.5)
        rotation.remove(old)
        time.sleep(0.5)
        stop_server(old)  # then SIGTERM: graceful
        time.sleep(0.5)
    finally:
        stop.set()
        poller.join()
    failures = [r for r in results if r != 200]
    assert failures == [], f"{len(failures)} of {len(results)} failed: {failures[:10]}"
    assert {old.url, new.url} <= set(answered) and len(results) >= 10


def test_cleanup_through_any_replica_leaves_the_bucket_empty(fleet):
    survivor = fleet.extra[0]
    jobs = httpx.get(f"{survivor.url}{API}/jobs", params={"limit": 1000}, timeout=30).json()["jobs"]
    for job in jobs:
        assert httpx.delete(f"{survivor.url}{API}/cleanup/{job['job_id']}", timeout=30).status_code == 200
    deadline = time.monotonic() + 60  # a running job's files go when its worker lets go (a chunk later)
    while fleet.keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fleet.keys() == []
