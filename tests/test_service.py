"""The real server (`bentoml serve service:LipSync`, tiny models on the CPU), through both API
surfaces: the seed guide's REST paths and BentoML's own endpoints."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from lipsync_runner.media.ffmpeg import probe_audio, probe_video
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

from .server import Server, running_server, start_server, stop_server

API = "/api/lip-sync"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("server"), models_dir,
                        LIP_SYNC_MAX_VIDEO_BYTES=str(3 * 2**20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def upload(client: httpx.Client, video: Path, audio: Path, **data) -> httpx.Response:
    with video.open("rb") as v, audio.open("rb") as a:
        return client.post(f"{API}/generate", files={"video": (video.name, v, "video/mp4"),
                                                     "audio": (audio.name, a, "audio/wav")}, data=data)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"{API}/status/{job_id}").json()
        if body["status"] in ("completed", "failed", "cancelled"):
            return body
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {body['status']} after {timeout} s")


def assert_playable_mp4_with_audio(path: Path, seconds: float) -> None:
    info = probe_video(path)
    assert (info.width, info.height) == (320, 240)
    assert abs(info.duration - seconds) <= 1 / 25 + 1e-3
    assert probe_audio(path).codec == "aac"


# ------------------------------------------------------------------ health and readiness


def test_health_reports_models_device_and_version_in_the_seed_format(client):
    body = client.get(f"{API}/health").json()
    assert body["status"] == "ready" and body["models_loaded"] is True
    assert body["device"] == "cpu" and body["model_version"] == "v15" and body["error"] is None
    assert client.get("/readyz").status_code == 200
    assert client.post("/health", json={}).json()["models_loaded"] is True  # the BentoML endpoint


# ------------------------------------------------------------------ the seed's curl example


def test_seed_flow_generate_poll_download_list_cleanup(client, media_dir, tmp_path):
    r = upload(client, media_dir / "face.mp4", media_dir / "speech_short.wav")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["success"] is True and body["status"] == "queued" and UUID.match(body["job_id"])
    job_id = body["job_id"]

    done = wait_done(client, job_id)
    assert done["status"] == "completed", done
    assert done["created_at"] and done["completed_at"] and done["progress"] == 1.0
    assert done["output_path"] == f"lip_sync_{job_id}.mp4"  # a name, never a server path

    r = client.get(f"{API}/download/{job_id}")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    out = tmp_path / "output.mp4"
    out.write_bytes(r.content)
    assert_playable_mp4_with_audio(out, 1.2)

    listed = client.get(f"{API}/jobs").json()
    assert listed["total"] >= 1 and job_id in [j["job_id"] for j in listed["jobs"]]

    assert client.delete(f"{API}/cleanup/{job_id}").json()["success"] is True
    assert client.get(f"{API}/status/{job_id}").status_code == 404
    assert client.get(f"{API}/download/{job_id}").status_code == 404


def test_wait_option_blocks_until_the_job_is_done(client, media_dir):
    r = upload(client, media_dir / "face.mp4", media_dir / "speech_short.wav", wait="true")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["status"] == "completed"
    assert client.get(f"{API}/download/{body['job_id']}").status_code == 200


def test_bentoml_sync_client_runs_a_job(server, media_dir, tmp_path):
    import bentoml

    with bentoml.SyncHTTPClient(server.url, timeout=120) as c:
        job = c.generate(video=media_dir / "face.mp4", audio=media_dir / "speech_long.wav", bbox_shift=0)
        assert job["status"] == "queued"
        deadline = time.monotonic() + 240
        while (status := c.status(job_id=job["job_id"]))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert status["status"] == "completed", status
        path = c.download(job_id=job["job_id"])
        assert_playable_mp4_with_audio(Path(path), 3.3)
        assert job["job_id"] in [j["job_id"] for j in c.jobs()["jobs"]]
        assert c.cleanup(job_id=job["job_id"])["success"] is True


def test_the_two_surfaces_answer_alike(server, client, media_dir, tmp_path):
    """REST and BentoML endpoints share one admission path and one set of operations."""
    face, speech = media_dir / "face.mp4", media_dir / "speech_short.wav"

    def bentoml_generate(video: Path, **fields) -> httpx.Response:  # as BentoML's client sends it: JSON fields
        with video.open("rb") as v, speech.open("rb") as a:
            data = {k: json.dumps(v_) for k, v_ in fields.items()}
            return client.post("/generate", files={"video": (video.name, v), "audio": (speech.name, a)}, data=data)

    rest, bento = upload(client, face, speech, bbox_shift="0"), bentoml_generate(face, bbox_shift=0, wait=False)
    assert rest.status_code == bento.status_code == 202
    assert set(rest.json()) == set(bento.json()) and rest.json()["status"] == bento.json()["status"] == "queued"
    job_id = bento.json()["job_id"]
    assert bento.json()["status_url"] == f"{API}/status/{job_id}"

    # bad input: the same status and the same words
    text = tmp_path / "clip.mp4"
    text.write_text("hello, not a video\n" * 50)
    a, b = upload(client, text, speech), bentoml_generate(text)
    assert a.status_code == b.status_code == 400 and a.json() == b.json()
    a, b = upload(client, face, speech, bbox_shift="up"), bentoml_generate(face, bbox_shift="up")
    assert a.status_code == b.status_code == 400 and a.json() == b.json()
    # BentoML's generate streams: a video over the limit is cut off with the seed's 413 body
    big = tmp_path / "big.mp4"
    big.write_bytes(face.read_bytes() * 40)
    a, b = upload(client, big, speech), bentoml_generate(big)
    assert a.status_code == b.status_code == 413 and a.json() == b.json() and a.json()["error"] == "File too large"

    # status, list, download, 404: identical
    done = wait_done(client, job_id)
    assert done["status"] == "completed"
    assert client.post("/status", json={"job_id": job_id}).json() == client.get(f"{API}/status/{job_id}").json()
    assert client.post("/jobs", json={"limit": 5}).json() == client.get(f"{API}/jobs?limit=5").json()
    rest_file, bento_file = client.get(f"{API}/download/{job_id}"), client.post("/download", json={"job_id": job_id})
    assert rest_file.content == bento_file.content and len(rest_file.content) > 1000
    assert rest_file.headers["content-disposition"] == bento_file.headers["content-disposition"]
    assert f"lip_sync_{job_id}.mp4" in rest_file.headers["content-disposition"]
    assert client.head(f"{API}/download/{job_id}").headers["content-length"] == str(len(rest_file.content))
    unknown = "00000000-0000-4000-8000-000000000000"
    assert (client.get(f"{API}/status/{unknown}").json() == client.post("/status", json={"job_id": unknown}).json()
            == {"error": "Job not found"})
    # paths nobody serves, and the probes, answer JSON too
    for r in (client.get("/nothing-here"), client.get(f"{API}/nothing-here"), client.put("/status")):
        assert r.status_code in (404, 405) and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"] in ("Not found", "Method not allowed")
    assert client.get("/readyz").json() == {"status": "ready"}
    client.delete(f"{API}/cleanup/{job_id}")
    client.delete(f"{API}/cleanup/{rest.json()['job_id']}")


# ------------------------------------------------------------------ batching across jobs


def test_frames_of_concurrent_jobs_share_runner_batches(client, media_dir):
    def jobs_per_batch() -> tuple[float, float]:
        text = client.get("/metrics").text
        count = sum(float(v) for v in re.findall(r"^lipsync_runner_jobs_per_batch_count\S* (\S+)$", text, re.M))
        single = sum(float(v) for v in
                     re.findall(r'^lipsync_runner_jobs_per_batch_bucket\{[^}]*le="1\.0"[^}]*\} (\S+)$', text, re.M))
        return count, single

    before = jobs_per_batch()
    ids = []
    threads = [threading.Thread(target=lambda: ids.append(
        upload(client, media_dir / "face.mp4", media_dir / "speech_long.wav").json()["job_id"])) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [wait_done(client, i) for i in ids]
    assert all(r["status"] == "completed" for r in results), results
    count, single = jobs_per_batch()
    multi_job_batches = (count - before[0]) - (single - before[1])
    assert multi_job_batches >= 1, "no generate batch held frames of two jobs"
    for i in ids:
        client.delete(f"{API}/cleanup/{i}")


# ------------------------------------------------------------------ errors, each with a real bad input


def test_400_for_a_text_file_named_mp4(client, media_dir, tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_text("hello, not a video\n" * 50)
    r = upload(client, fake, media_dir / "speech_short.wav")
    assert r.status_code == 400 and "clip.mp4" in r.json()["error"]


def test_400_for_audio_without_an_audio_stream(client, media_dir):
    r = upload(client, media_dir / "face.mp4", media_dir / "face.mp4")
    assert r.status_code == 400 and "audio" in r.json()["error"].lower()


def test_400_for_bad_bbox_shift(client, media_dir):
    r = upload(client, media_dir / "face.mp4", media_dir / "speech_short.wav", bbox_shift="up")
    assert r.status_code == 400 and "bbox_shift" in r.json()["error"]


def test_404_for_unknown_and_malformed_job_ids(client):
    assert client.get(f"{API}/status/00000000-0000-4000-8000-000000000000").status_code == 404
    for bad in ("..%2F..%2Fetc%2Fpasswd", "abc", "%00"):
        assert client.get(f"{API}/status/{bad}").status_code == 404
    assert client.post("/status", json={"job_id": "../../etc"}).status_code == 404


def test_409_for_downloading_an_unfinished_job(client, media_dir):
    job_id = upload(client, media_dir / "face.mp4", media_dir / "speech_long.wav").json()["job_id"]
    r = client.get(f"{API}/download/{job_id}")
    assert r.status_code == 409 and "error" in r.json()
    wait_done(client, job_id)
    client.delete(f"{API}/cleanup/{job_id}")


def test_413_for_a_video_over_the_limit(client, media_dir, tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes((media_dir / "face.mp4").read_bytes() * 40)  # over the 3 MB test limit
    r = upload(client, big, media_dir / "speech_short.wav")
    assert r.status_code == 413


def test_a_failing_job_records_its_error_and_others_still_complete(client, media_dir, tmp_path):
    blank = write_face_video(tmp_path / "room.mp4", seconds=1, blank_frames=tuple(range(25)))
    bad = upload(client, blank, media_dir / "speech_short.wav").json()["job_id"]
    good = upload(client, media_dir / "face.mp4", media_dir / "speech_short.wav").json()["job_id"]
    failed, done = wait_done(client, bad), wait_done(client, good)
    assert failed["status"] == "failed" and "no face" in failed["error"]
    assert done["status"] == "completed"


def test_no_traceback_or_internal_path_in_error_responses(client, server, media_dir, tmp_path):
    fake = tmp_path / "x.mp4"
    fake.write_bytes(b"\x00" * 100)
    for r in (upload(client, fake, media_dir / "speech_short.wav"), client.get(f"{API}/status/nope"),
              client.post("/status", json={"job_id": "nope"})):
        assert "Traceback" not in r.text and str(server.data_dir) not in r.text and str(tmp_path) not in r.text


def test_metrics_expose_job_counts_durations_frames_and_batch_sizes(client):
    text = client.get("/metrics").text
    for name in ('lipsync_jobs{status="completed"}', "lipsync_job_duration_seconds", "lipsync_frames_generated",
                 "lipsync_runner_batch_size"):
        assert name in text, name
    # jobs completed earlier in this module: their frames and their usage are counted, not just declared
    frames = [float(v) for v in re.findall(r"^lipsync_frames_generated_total(?:\{[^}]*\})? (\S+)$", text, re.M)]
    assert frames and sum(frames) > 0, frames
    usage = [float(v) for v in re.findall(r'^lipsync_usage_jobs_total\{[^}]*status="completed"[^}]*\} (\S+)$', text,
                                          re.M)]
    assert usage and sum(usage) > 0, [line for line in text.splitlines() if "usage" in line][:10]
    assert re.search(r"^lipsync_usage_frames_total\{", text, re.M)


# ------------------------------------------------------------------ models not loaded


def test_503_while_models_are_not_loaded_and_health_says_why(tmp_path, models_dir, media_dir):
    broken = tmp_path / "models"
    broken.mkdir()
    server = start_server(tmp_path, broken, ready=False)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            deadline = time.monotonic() + 60
            while (h := c.get(f"{API}/health")).json()["status"] == "loading" and time.monotonic() < deadline:
                time.sleep(0.5)
            assert h.status_code == 503
            body = h.json()
            assert body["models_loaded"] is False and "musetalk" in body["error"].lower()
            assert c.get("/readyz").status_code == 503
            r = upload(c, media_dir / "face.mp4", media_dir / "speech_short.wav")
            assert r.status_code == 503 and "Models not loaded" in r.json()["details"]
    finally:
        stop_server(server)


# ------------------------------------------------------------------ crash and restart


def test_a_job_survives_a_killed_server_and_finished_jobs_stay_downloadable(tmp_path, models_dir, media_dir):
    long_audio = write_speech_like_audio(tmp_path / "long.wav", seconds=6)  # long enough to be killed mid-job
    server = start_server(tmp_path, models_dir)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            finished = upload(c, media_dir / "face.mp4", media_dir / "speech_short.wav", wait="true").json()
            running = upload(c, media_dir / "face.mp4", long_audio).json()["job_id"]
            deadline = time.monotonic() + 60
            while c.get(f"{API}/status/{running}").json()["status"] != "processing":
                assert time.monotonic() < deadline
                time.sleep(0.2)
        server.kill()  # SIGKILL mid-job
        server = start_server(tmp_path, models_dir)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            assert c.get(f"{API}/download/{finished['job_id']}").status_code == 200
            done = wait_done(c, running, timeout=300)
            assert done["status"] == "completed" and done["attempts"] == 2, done
            r = c.get(f"{API}/download/{running}")
            out = tmp_path / "after_restart.mp4"
            out.write_bytes(r.content)
            assert abs(probe_video(out).duration - 6) <= 0.05
        # nothing of the killed attempt is left behind: no partial output, no frame scratch file (beside
        # the files, the progressive output: live.m3u8 and its segments, test_progressive.py)
        job_dir = server.data_dir / "jobs" / running
        names = sorted(p.name for p in job_dir.iterdir())
        # (and the result's content credentials, test_credentials.py)
        assert [n for n in names if not n.startswith("live")] == ["credentials.json", "input_audio.wav",
                                                                  "input_video.mp4", "output.mp4", "thumbnail.jpg"]
        assert "live.m3u8" in names and not [n for n in names if n.endswith(".tmp")]
    finally:
        stop_server(server)
