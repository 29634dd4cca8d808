"""The client SDK (``lipsync_client``) and the ``lipsync`` CLI against the real server
(``bentoml serve service:LipSync``, tiny models on the CPU)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import httpx
import pytest

from lipsync_client import (
    AsyncLipSyncClient,
    BadRequest,
    ConnectionFailed,
    Job,
    JobFailed,
    LipSyncClient,
    NotFinished,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    WaitTimeout,
)
from lipsync_client import errors as E
from lipsync_client.cli import exit_code
from lipsync_runner.media.ffmpeg import probe_video
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

from .server import ROOT, Server, free_port, running_server

UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
SPEECH_S = 0.6  # short jobs keep the module fast on the CPU


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("client-server"), models_dir,
                        LIP_SYNC_MAX_VIDEO_BYTES=str(3 * 2**20)) as srv:
        yield srv


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return write_speech_like_audio(tmp_path_factory.mktemp("speech") / "speech.wav", seconds=SPEECH_S)


@pytest.fixture(scope="module")
def client(server: Server) -> LipSyncClient:
    with LipSyncClient(server.url, timeout=60) as c:
        yield c


def lipsync(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
    """Run the CLI as a script would: a subprocess, its exit code, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIPSYNC_SERVER", "LIPSYNC_TOKEN")}
    if token:
        env["LIPSYNC_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "lipsync_client.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_cli_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().endswith(errors[0]), result.stderr  # one line, the last
    for word in words:
        assert word.lower() in errors[0].lower(), errors[0]


def assert_playable(path: Path, seconds: float) -> None:
    info = probe_video(path)
    assert (info.width, info.height) == (320, 240)
    assert abs(info.duration - seconds) <= 1 / 25 + 1e-3


# ------------------------------------------------------------------ packaging


def test_the_client_imports_without_torch_numpy_or_bentoml():
    """Light: of the server package it uses only the job-parameter schema (pydantic only)."""
    code = textwrap.dedent("""
        import sys
        ALLOWED = ("lipsync_runner", "lipsync_runner.params", "lipsync_runner.errors")
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "numpy", "bentoml", "cv2") or (
                        name.startswith("lipsync_runner") and name not in ALLOWED):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import lipsync_client, lipsync_client.cli
        from lipsync_client import LipSyncClient, AsyncLipSyncClient
        LipSyncClient("http://example.invalid").close()
        print("ok", sorted(m for m in ("torch", "numpy", "bentoml") if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok []"


# ------------------------------------------------------------------ the SDK


def test_sdk_generate_wait_download_list_cleanup(client, media_dir, speech, tmp_path):
    health = client.health()
    assert health.ready and health.models_loaded and health.device == "cpu"

    job = client.generate(media_dir / "face.mp4", speech, bbox_shift=0)
    assert job.status == "queued" and not job.finished

    seen = []
    done = client.wait(job.job_id, progress=seen.append)
    assert done.completed and done.progress == 1.0 and done.output_path == f"lip_sync_{job.job_id}.mp4"
    assert seen and seen[-1].status == "completed"
    assert len({(j.status, j.stage, j.progress) for j in seen}) == len(seen)  # called on changes only
    assert done.created_at.tzinfo is not None and done.completed_at >= done.created_at

    out = client.download(job.job_id, tmp_path / "out.mp4")
    assert out == tmp_path / "out.mp4"
    assert_playable(out, SPEECH_S)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary file left

    listing = client.jobs()
    assert job.job_id in [j.job_id for j in listing.jobs] and listing.total >= 1

    assert client.cleanup(job.job_id).success
    with pytest.raises(NotFound):
        client.status(job.job_id)


def test_async_twin_runs_a_job_with_an_async_progress_callback(server, media_dir, speech, tmp_path):
    async def scenario() -> None:
        seen = []

        async def progress(job) -> None:
            seen.append(job.status)

        async with AsyncLipSyncClient(server.url, timeout=60) as c:
            assert (await c.health()).ready
            job = await c.generate(media_dir / "face.mp4", speech, wait=True,
                                   progress=progress)
            assert job.completed and seen[-1] == "completed"
            assert (await c.status(job.job_id)).completed
            out = await c.download(job.job_id, tmp_path)  # a directory: lip_sync_<id>.mp4 in it
            assert out.name == f"lip_sync_{job.job_id}.mp4"
            assert_playable(out, SPEECH_S)
            assert job.job_id in [j.job_id for j in (await c.jobs()).jobs]
            await c.cleanup(job.job_id)
            with pytest.raises(NotFound):
                await c.status(job.job_id)
            with pytest.raises(BadRequest):
                await c.generate(media_dir / "face.mp4", media_dir / "face.mp4")  # no sound in the "audio"

    asyncio.run(scenario())


def test_a_large_download_streams_to_disk_without_loading_it_into_memory(client, server, media_dir, speech,
                                                                          tmp_path):
    job = client.generate(media_dir / "face.mp4", speech, wait=True)
    output = server.data_dir / "jobs" / job.job_id / "output.mp4"
    assert output.is_file()
    size = 300 * 2**20
    with output.open("r+b") as f:  # a sparse 300 MB file: nothing to hold in memory on either side
        f.truncate(size)

    target = tmp_path / "big.mp4"
    tracemalloc.start()
    try:
        client.download(job.job_id, target)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert target.stat().st_size == size
    assert peak < 20 * 2**20, f"peak Python memory {peak / 2**20:.1f} MB"

    # an error half-way (here: the progress callback gives up) leaves no partial file behind
    def give_up(done: int, total: int | None) -> None:
        if done > 20 * 2**20:
            raise RuntimeError("enough")

    partial = tmp_path / "partial.mp4"
    with pytest.raises(RuntimeError):
        client.download(job.job_id, partial, progress=give_up)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.mp4"]
    client.cleanup(job.job_id)


# ------------------------------------------------------------------ errors, each from a real bad input


def test_errors_map_to_typed_exceptions_with_the_servers_message(client, media_dir, tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_text("hello, not a video\n" * 50)
    with pytest.raises(BadRequest) as err:
        client.generate(fake, media_dir / "speech_short.wav")
    assert err.value.status_code == 400 and "clip.mp4" in err.value.message

    with pytest.raises(NotFound) as err:
        client.status(UNKNOWN_ID)
    assert err.value.status_code == 404 and str(err.value) == err.value.body["error"]  # the server's words
    with pytest.raises(NotFound):
        client.download("../../etc/passwd", tmp_path / "x.mp4")

    big = tmp_path / "big.mp4"
    big.write_bytes((media_dir / "face.mp4").read_bytes() * 40)  # over the server's 3 MB limit
    with pytest.raises(PayloadTooLarge) as err:
        client.generate(big, media_dir / "speech_short.wav")
    assert err.value.status_code == 413 and "exceeds" in err.value.message

    job = client.generate(media_dir / "face.mp4", media_dir / "speech_long.wav")
    with pytest.raises(NotFinished) as err:
        client.download(job.job_id, tmp_path / "early.mp4")
    assert err.value.status_code == 409
    assert not (tmp_path / "early.mp4").exists()
    with pytest.raises(WaitTimeout) as err:
        client.wait(job.job_id, timeout=0.3)
    assert err.value.job.job_id == job.job_id and not err.value.job.finished
    assert_cli_error(lipsync("wait", job.job_id, "--wait-timeout", "0.2", "--server", client.base_url), 6, "still")
    client.cleanup(job.job_id)  # cancels it



def test_a_server_that_is_down_raises_connection_failed(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    with LipSyncClient(down, timeout=5, retries=1) as c:
        with pytest.raises(ConnectionFailed) as err:
            c.health()
    assert err.value.status_code is None and "127.0.0.1" in err.value.message
    assert_cli_error(lipsync("health", "--server", down), 5, "cannot reach")
    assert_cli_error(lipsync("--server", down, "jobs"), 5, "cannot reach")


def test_statuses_without_a_real_trigger_map_too_and_gets_are_retried():
    """429 / 503 / 507 / 5xx and connection drops, which the tiny server cannot be made to give
    cheaply, through a mock transport; plus a path prefix and the bearer header (BentoCloud style)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        path = request.url.path
        assert request.headers["authorization"] == "Bearer tok"
        if path == "/team/api/lip-sync/jobs" and len(calls) == 1:
            raise httpx.ConnectError("connection reset")
        if path == "/team/api/lip-sync/jobs":
            return httpx.Response(200, json={"total": 0, "jobs": []})
        if path == "/team/api/lip-sync/health":
            return httpx.Response(503, json={"status": "loading", "models_loaded": False, "error": "loading weights"})
        if path.endswith("/generate"):
            raise httpx.ConnectError("refused")
        code = int(path.rsplit("/", 1)[-1][:3])
        bodies = {429: {"error": "Too many queued jobs"}, 503: {"error": "Lip sync service not available",
                  "details": "Models not loaded"}, 507: {"error": "Not enough free disk space"}}
        if code in bodies:
            return httpx.Response(code, json=bodies[code], headers={"Retry-After": "7"})
        return httpx.Response(code, text="<html>oops</html>")

    with LipSyncClient("https://deploy.example/team/", token="tok", transport=httpx.MockTransport(handler)) as c:
        assert c.jobs().total == 0 and len(calls) == 2  # the GET was retried after the dropped connection
        health = c.health()
        assert not health.ready and health.error == "loading weights"
        cases = {"429": E.TooManyRequests, "503": E.ServiceUnavailable, "507": E.InsufficientStorage,
                 "500": E.ServerError, "502": E.ServerError}
        for code, cls in cases.items():
            with pytest.raises(cls) as err:
                c.status(f"{code}-0000")
            assert err.value.status_code == int(code) and exit_code(err.value) == 5
        with pytest.raises(E.TooManyRequests) as err:
            c.status("429-0000")
        assert err.value.retry_after == 7.0
        with pytest.raises(E.ServiceUnavailable, match="Lip sync service not available: Models not loaded"):
            c.status("503-0000")
        with pytest.raises(E.ServerError, match="HTTP 500 Internal Server Error"):
            c.status("500-0000")
        calls.clear()
        with pytest.raises(ConnectionFailed):
            c.generate(__file__, __file__)
        assert len(calls) == 1  # a POST is never retried

    failed = E.JobFailed(Job(job_id="j", status="failed"))
    for exc, code in ((failed, 1), (E.BadRequest("x"), 2), (E.PayloadTooLarge("x"), 2), (E.NotFound("x"), 3),
                      (E.NotFinished("x"), 3), (E.Unauthorized("x"), 4), (E.ConnectionFailed("x"), 5),
                      (FileNotFoundError("x"), 2)):
        assert exit_code(exc) == code


def test_every_job_parameter_reaches_the_server_by_its_schema_name(tmp_path):
    """The SDK and the CLI take each JobParams field (lipsync_runner/params.py) and send it as is."""
    from lipsync_client.cli import build_parser
    from lipsync_runner.params import JobParams

    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        sent.append({part.split(b'"')[1].decode(): part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
                     for part in body.split(b"--" + request.headers["content-type"].split("boundary=")[1].encode())
                     if b'name="' in part and b"filename=" not in part})
        return httpx.Response(202, json={"job_id": "j", "status": "queued"})

    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    example = {name: (info.default if info.default is not None else "x") for name, info in JobParams.model_fields.items()}
    with LipSyncClient("http://t", transport=httpx.MockTransport(handler)) as c:
        c.generate(video, video, **example)
        c.generate(video, video)  # nothing given: nothing sent, the deployment's defaults apply
    assert set(sent[0]) == set(JobParams.model_fields)
    assert sent[0]["bbox_shift"] == json.dumps(example["bbox_shift"]).encode()
    assert sent[1] == {}
    options = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    assert {f"param_{name}" for name in JobParams.model_fields} <= options


def test_the_cli_refuses_a_bad_parameter_before_uploading(tmp_path):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    r = lipsync("generate", str(video), str(video), "--server", "http://127.0.0.1:9", "--bbox-shift", "999")
    assert r.returncode == 2 and "bbox_shift" in r.stderr and "less than or equal to 100" in r.stderr


# ------------------------------------------------------------------ the CLI


def test_cli_generate_status_jobs_cleanup_health(server, media_dir, speech, tmp_path):
    out = tmp_path / "result.mp4"
    r = lipsync("generate", str(media_dir / "face.mp4"), str(speech), "-o", str(out),
                "--server", server.url, "--bbox-shift", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out.resolve())  # stdout: the output path, nothing else
    assert "100%" in r.stderr and "completed" in r.stderr  # the progress bar
    assert_playable(out, SPEECH_S)
    job_id = next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("job "))

    r = lipsync("status", job_id, "--json", "--server", server.url)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "completed"
    r = lipsync("--server", server.url, "status", job_id)
    assert r.returncode == 0 and "completed" in r.stdout

    r = lipsync("jobs", "--json", "--server", server.url)
    listing = json.loads(r.stdout)
    assert r.returncode == 0 and job_id in [j["job_id"] for j in listing["jobs"]]
    r = lipsync("jobs", "--server", server.url)
    assert r.returncode == 0 and job_id in r.stdout

    r = lipsync("cleanup", job_id, "--server", server.url)
    assert r.returncode == 0 and job_id in r.stdout
    assert_cli_error(lipsync("status", job_id, "--server", server.url), 3)

    r = lipsync("health", "--server", server.url)
    assert r.returncode == 0 and r.stdout.startswith("ready")
    r = lipsync("health", "--json", "--server", server.url)
    assert r.returncode == 0 and json.loads(r.stdout)["models_loaded"] is True


def test_cli_exit_codes_and_messages_for_bad_input(server, media_dir, tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_text("hello, not a video\n" * 50)
    out = tmp_path / "out.mp4"
    audio = str(media_dir / "speech_short.wav")
    assert_cli_error(lipsync("generate", str(fake), audio, "-o", str(out), "--server", server.url), 2, "clip.mp4")
    big = tmp_path / "big.mp4"
    big.write_bytes((media_dir / "face.mp4").read_bytes() * 40)
    assert_cli_error(lipsync("generate", str(big), audio, "-o", str(out), "--server", server.url), 2, "too large")
    assert_cli_error(lipsync("generate", str(tmp_path / "missing.mp4"), audio, "--server", server.url), 2,
                     "not found")
    assert_cli_error(lipsync("generate", str(media_dir / "face.mp4"), audio, "-o", str(tmp_path / "no" / "x.mp4"),
                             "--server", server.url), 2, "does not exist")
    assert lipsync("generate", "--server", server.url).returncode == 2  # usage
    assert_cli_error(lipsync("status", UNKNOWN_ID, "--server", server.url), 3)
    assert_cli_error(lipsync("download", UNKNOWN_ID, "-o", str(out), "--server", server.url), 3)
    assert not out.exists()



def test_a_failed_job_raises_job_failed_and_exits_1(client, server, media_dir, tmp_path):
    blank = write_face_video(tmp_path / "room.mp4", seconds=1, blank_frames=tuple(range(25)))  # no face
    job = client.generate(blank, media_dir / "speech_short.wav")
    r = lipsync("wait", job.job_id, "--server", server.url)
    assert_cli_error(r, 1, job.job_id, "failed", "no face")
    with pytest.raises(JobFailed) as err:
        client.wait(job.job_id)
    assert err.value.job.status == "failed" and "no face" in err.value.job.error
    client.cleanup(job.job_id)


# ------------------------------------------------------------------ bearer tokens


def test_bearer_token_auth(tmp_path, models_dir, media_dir):
    with running_server(tmp_path, models_dir, LIP_SYNC_API_TOKENS="secret-token") as srv:
        with LipSyncClient(srv.url, token="") as anonymous:
            assert anonymous.health().ready  # health stays open
            with pytest.raises(Unauthorized) as err:
                anonymous.jobs()
            assert err.value.status_code == 401 and "token" in err.value.message.lower()
        with LipSyncClient(srv.url, token="wrong-token") as wrong:
            with pytest.raises(Unauthorized):
                wrong.status(UNKNOWN_ID)
            with pytest.raises(Unauthorized):
                wrong.generate(media_dir / "face.mp4", media_dir / "speech_short.wav")
        with LipSyncClient(srv.url, token="secret-token") as c:
            job = c.generate(media_dir / "face.mp4", media_dir / "speech_long.wav")
            assert c.status(job.job_id).job_id == job.job_id
            assert job.job_id in [j.job_id for j in c.jobs().jobs]
            with pytest.raises(NotFinished):  # past the token check, the job is still running
                c.download(job.job_id, tmp_path / "auth.mp4")

        assert_cli_error(lipsync("jobs", "--server", srv.url), 4, "token")
        assert_cli_error(lipsync("jobs", "--server", srv.url, "--token", "wrong-token"), 4)
        assert lipsync("health", "--server", srv.url).returncode == 0
        r = lipsync("jobs", "--json", "--server", srv.url, token="secret-token")  # from $LIPSYNC_TOKEN
        assert r.returncode == 0 and job.job_id in r.stdout
        with LipSyncClient(srv.url, token="secret-token") as c:
            c.cleanup(job.job_id)
