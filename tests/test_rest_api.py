"""The seed-compatible REST API over an in-memory fake JobManager (no models, no GPU)."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lipsync_runner.config import ApiLimits, ServiceSettings
from lipsync_runner.api import BodySizeLimitMiddleware, create_rest_app
from lipsync_runner.jobs.schemas import job_summary, status_body
from lipsync_runner.errors import (
    InsufficientStorageError,
    ModelsNotReadyError,
    JobNotFinishedError,
    JobNotFoundError,
    QueueFullError,
)
from lipsync_runner.jobs.records import JobParams, JobRecord, JobStatus, new_job_id, utcnow
from lipsync_runner.params import is_job_id
from lipsync_runner.media.ffmpeg import ffmpeg_exe
from lipsync_runner.storage.local import LocalObject

TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")  # ISO 8601, UTC, with its zone
PREFIX = "/api/lip-sync"


# --------------------------------------------------------------------------- fake manager


class FakeManager:
    """In-memory stand-in for lipsync_runner.jobs.manager.JobManager."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: dict[str, JobRecord] = {}
        self.uploads: dict[str, Path] = {}
        self.discarded: list[str] = []
        self.submitted: list[dict] = []
        self.new_upload_calls = 0
        self.fail_new_upload: Exception | None = None
        self.keep_discarded_dirs = False
        self.finish_on_wait: JobStatus | None = JobStatus.completed
        self.raise_on_get: Exception | None = None

    def new_upload(self, owner: str | None = None) -> tuple[str, Path]:
        self.new_upload_calls += 1
        if self.fail_new_upload is not None:
            raise self.fail_new_upload
        job_id = new_job_id()
        job_dir = self.root / job_id
        job_dir.mkdir()
        self.uploads[job_id] = job_dir
        return job_id, job_dir

    def discard_upload(self, job_id: str) -> None:
        self.discarded.append(job_id)
        job_dir = self.uploads.pop(job_id, None)
        if job_dir is not None and not self.keep_discarded_dirs:
            shutil.rmtree(job_dir, ignore_errors=True)

    def check_free_space(self) -> None:
        if self.fail_new_upload is not None and isinstance(self.fail_new_upload, InsufficientStorageError):
            raise self.fail_new_upload

    def submit(self, job_id, *, video_file, audio_file, video_filename, audio_filename, params, owner=None,
               media=None):
        assert job_id in self.uploads
        assert isinstance(params, JobParams)
        self.submitted.append(
            dict(job_id=job_id, video_file=video_file, audio_file=audio_file, video_filename=video_filename,
                 audio_filename=audio_filename, params=params, owner=owner, media=media)
        )  # fmt: skip
        record = JobRecord(
            job_id=job_id,
            params=params,
            owner=owner,
            video_filename=video_filename,
            audio_filename=audio_filename,
            video_file=video_file,
            audio_file=audio_file,
            media=media,
            expires_at=utcnow() + timedelta(hours=24),
        )
        self.jobs[job_id] = record
        return record

    def _record(self, job_id: str, owner: str | None) -> JobRecord:
        record = self.jobs.get(job_id) if is_job_id(job_id) else None
        if record is None or record.owner != owner:
            raise JobNotFoundError("Job not found")
        return record

    def get(self, job_id, owner=None):
        if self.raise_on_get is not None:
            raise self.raise_on_get
        return self._record(job_id, owner)

    def list(self, owner=None, limit=100):
        mine = [r for r in self.jobs.values() if r.owner == owner]
        return sorted(mine, key=lambda r: r.created_at, reverse=True)[:limit]

    def input_path(self, job_id, name, owner=None):
        self._record(job_id, owner)
        path = self.root / job_id / name
        if not path.is_file():
            raise JobNotFoundError("Job not found")
        return path

    def output_path(self, job_id, owner=None):
        record = self._record(job_id, owner)
        if record.status != JobStatus.completed:
            raise JobNotFinishedError(f"Job is {record.status.value}: no result to download")
        return self.root / job_id / record.output_file

    def open_output(self, job_id, owner=None):
        return LocalObject(self.output_path(job_id, owner))

    def open_file(self, job_id, name, owner=None):
        return LocalObject(self.input_path(job_id, name, owner))

    def cancel(self, job_id, owner=None):
        record = self._record(job_id, owner)
        if record.status.finished:
            raise JobNotFinishedError(f"Job is already {record.status.value}")
        self._set(job_id, status=JobStatus.cancelled, stage="cancelled", completed_at=utcnow())
        return self.jobs[job_id]

    def cleanup(self, job_id, owner=None):
        self._record(job_id, owner)
        del self.jobs[job_id]
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    async def wait_async(self, job_id, timeout=None):
        if self.finish_on_wait is not None:
            self.finish(job_id, self.finish_on_wait, error="No face detected in input.mp4")
        return self.jobs[job_id]

    def counts(self):
        out: dict[str, int] = {}
        for r in self.jobs.values():
            out[r.status.value] = out.get(r.status.value, 0) + 1
        return out

    # test helpers
    def _set(self, job_id: str, **changes) -> None:
        self.jobs[job_id] = self.jobs[job_id].model_copy(update=changes)

    def finish(self, job_id: str, status: JobStatus = JobStatus.completed, error: str | None = None) -> None:
        if status == JobStatus.completed:
            (self.root / job_id / "output.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
            self._set(job_id, status=status, stage="done", progress=1.0, output_file="output.mp4", frames=10,
                      timings={"total": 1.5}, attempts=1, completed_at=utcnow())  # fmt: skip
        else:
            self._set(job_id, status=status, stage=status.value, error=error, attempts=1, completed_at=utcnow())


# --------------------------------------------------------------------------- fixtures


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api_media")
    src = ["-f", "lavfi", "-i", "testsrc2=size=64x64:rate=10:duration=1"]
    _ffmpeg(*src, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(root / "video_only.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=1", str(root / "audio.wav"))
    (root / "notes.txt").write_text("this is not a video\n" * 20)
    _ffmpeg(*src, "-f", "lavfi", "-i", "sine=frequency=300:sample_rate=16000:duration=1", "-c:v", "libx264",
            "-pix_fmt", "yuv420p", "-c:a", "aac", str(root / "with_sound.mp4"))
    return {
        "video": root / "video_only.mp4",
        "audio": root / "audio.wav",
        "av": root / "with_sound.mp4",
        "text": root / "notes.txt",
    }


@pytest.fixture
def fake(tmp_path: Path) -> FakeManager:
    root = tmp_path / "jobs"
    root.mkdir()
    return FakeManager(root)


class Health:
    def __init__(self) -> None:
        self.body = {"status": "ready", "models_loaded": True, "device": "cuda", "error": None, "queue": 0}
        self.fail = False

    async def __call__(self) -> dict:
        if self.fail:
            raise RuntimeError("boom")
        return dict(self.body)


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def limits() -> ApiLimits:
    return ApiLimits(max_video_bytes=5 * 1024 * 1024, max_audio_bytes=2 * 1024 * 1024)


@pytest.fixture
def responses_seen(tmp_path_factory: pytest.TempPathFactory):
    """Every response body of the test; none may name a temporary (server-side) path."""
    seen: list[bytes] = []
    yield seen
    base = str(tmp_path_factory.getbasetemp()).encode()
    for body in seen:
        assert base not in body, body[:500]


def _client(app, seen: list[bytes], **kw) -> TestClient:
    client = TestClient(app, **kw)

    def hook(response: httpx.Response) -> None:
        response.read()
        seen.append(response.content)

    client.event_hooks = {"request": [], "response": [hook]}
    return client


@pytest.fixture
def client(fake: FakeManager, health: Health, limits: ApiLimits, responses_seen) -> TestClient:
    return _client(create_rest_app(fake, health, limits), responses_seen)


def _files(media: dict[str, Path], video: str = "video", audio: str = "audio", **names: str) -> dict:
    vpath, apath = media[video], media[audio]
    return {
        "video": (names.get("video_name", "clip.mp4"), vpath.read_bytes(), "video/mp4"),
        "audio": (names.get("audio_name", "speech.wav"), apath.read_bytes(), "audio/wav"),
    }


def _queued(client: TestClient, media: dict[str, Path]) -> str:
    resp = client.post("/generate", files=_files(media))
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def _no_leftovers(fake: FakeManager) -> None:
    assert list(fake.root.iterdir()) == []
    assert fake.submitted == []


# --------------------------------------------------------------------------- health


def test_health_ready(client: TestClient) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ready", "models_loaded": True, "device": "cuda", "error": None, "queue": 0}


def test_health_not_ready_is_503(client: TestClient, health: Health) -> None:
    health.body = {"status": "loading", "models_loaded": False, "device": "cuda", "error": None}
    resp = client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["status"] == "loading" and resp.json()["models_loaded"] is False
    health.fail = True
    resp = client.get("/health")
    assert resp.status_code == 503
    assert resp.json()["models_loaded"] is False and "boom" not in resp.text


# --------------------------------------------------------------------------- generate


def test_generate_queues_job_and_stores_files_under_safe_names(client, fake, media) -> None:
    resp = client.post(
        "/generate",
        files=_files(media, video_name="../../etc/My Clip.MP4", audio_name="C:\\Users\\me\\voice.wav"),
        data={"bbox_shift": "-7"},
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    job_id = body["job_id"]
    assert is_job_id(job_id)
    assert body == {
        "success": True,
        "job_id": job_id,
        "status": "queued",
        "message": "Lip sync job queued",
        "status_url": f"{PREFIX}/status/{job_id}",
        "download_url": f"{PREFIX}/download/{job_id}",
        "output_path": None,
    }
    job_dir = fake.root / job_id
    assert sorted(p.name for p in job_dir.iterdir()) == ["input_audio.wav", "input_video.mp4", "thumbnail.jpg"]
    assert (job_dir / "input_video.mp4").read_bytes() == media["video"].read_bytes()
    assert (job_dir / "input_audio.wav").read_bytes() == media["audio"].read_bytes()
    (sub,) = fake.submitted
    assert sub["video_file"] == "input_video.mp4" and sub["audio_file"] == "input_audio.wav"
    assert sub["video_filename"] == "My Clip.MP4" and sub["audio_filename"] == "voice.wav"
    assert sub["params"].bbox_shift == -7 and sub["owner"] is None
    assert sub["media"] == {"video": {"duration_s": 1.0, "fps": "10/1", "width": 64, "height": 64, "frames": 10,
                                      "demuxer": "mov"},
                            "audio": {"duration_s": 1.0, "demuxer": "wav"}}
    assert fake.discarded == []


def test_inputs_are_recognised_by_content_not_by_name(client, fake, media) -> None:
    """An MP4 with sound as the audio, names without or with the wrong extension: all by content."""
    cases = [dict(video_name="clip", audio_name="speech"),  # no extension at all
             dict(video_name="clip.txt", audio_name="voice.flac"),  # wrong ones
             dict(audio="av", audio_name="dub.mp4")]  # a video whose sound track is the speech
    for kw in cases:
        names = {k: v for k, v in kw.items() if k.endswith("_name")}
        kinds = {k: v for k, v in kw.items() if not k.endswith("_name")}
        resp = client.post("/generate", files=_files(media, **kinds, **names))
        assert resp.status_code == 202, (kw, resp.text)
    stored = [(s["video_file"], s["audio_file"], s["video_filename"], s["audio_filename"]) for s in fake.submitted]
    assert stored == [("input_video", "input_audio", "clip", "speech"),
                      ("input_video", "input_audio", "clip.txt", "voice.flac"),
                      ("input_video.mp4", "input_audio.mp4", "clip.mp4", "dub.mp4")]


def test_a_job_keeps_its_inputs_viewable(client, fake, media) -> None:
    job_id = _queued(client, media)
    status = client.get(f"/status/{job_id}").json()
    inputs = status["inputs"]
    assert inputs["video_filename"] == "clip.mp4" and inputs["audio_filename"] == "speech.wav"
    assert inputs["video_duration_s"] == 1.0 and inputs["width"] == 64 and inputs["fps"] == "10/1"
    prefix = PREFIX + f"/jobs/{job_id}"
    assert inputs["video_url"] == prefix + "/inputs/video" and inputs["thumbnail_url"] == prefix + "/thumbnail.jpg"
    video = client.get(f"/jobs/{job_id}/inputs/video")
    assert video.status_code == 200 and video.content == media["video"].read_bytes()
    assert video.headers["content-type"] == "video/mp4"
    assert video.headers["content-disposition"].startswith("inline")
    assert client.get(f"/jobs/{job_id}/inputs/audio").content == media["audio"].read_bytes()
    thumb = client.get(f"/jobs/{job_id}/thumbnail.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.content[:2] == b"\xff\xd8"  # a JPEG
    assert client.head(f"/jobs/{job_id}/inputs/video").headers["content-length"] == str(media["video"].stat().st_size)
    for bad in (f"/jobs/{job_id}/inputs/output", f"/jobs/{job_id}/inputs/..%2Fjobs.sqlite3", f"/jobs/{new_job_id()}/inputs/video"):
        resp = client.get(bad)
        assert resp.status_code == 404 and resp.json()["error"] in ("Job not found", "Not found"), bad


def test_generate_wait_returns_final_body(client, fake, media) -> None:
    resp = client.post("/generate?wait=true", files=_files(media))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    job_id = body["job_id"]
    assert body["success"] is True and body["status"] == "completed"
    assert body["message"] == "Lip sync completed successfully"
    assert body["output_path"] == f"lip_sync_{job_id}.mp4"
    assert body["download_url"] == f"{PREFIX}/download/{job_id}"

    # as a form field too; a failed job is HTTP 200 with success false and the error
    fake.finish_on_wait = JobStatus.failed
    resp = client.post("/generate", files=_files(media), data={"wait": "true"})
    assert resp.status_code == 200
    body = resp.json()
    assert body["success"] is False and body["status"] == "failed"
    assert body["error"] == body["message"] == "No face detected in input.mp4"
    assert body["output_path"] is None and body["download_url"] is None

    # a wait that ends before the job does falls back to the 202 body
    fake.finish_on_wait = None
    resp = client.post("/generate", files=_files(media), data={"wait": "1"})
    assert resp.status_code == 202 and resp.json()["status"] == "queued"


@pytest.mark.parametrize(
    "case, files_kw, data, expect",
    [
        ("text as mp4", dict(video="text"), {}, "clip.mp4"),
        ("text as audio", dict(audio="text", audio_name="a.wav"), {}, "a.wav"),
        ("video-only audio", dict(audio="video", audio_name="speech.m4a"), {}, "speech.m4a has no audio stream"),
        ("bbox not int", {}, {"bbox_shift": "abc"}, "bbox_shift: Input should be a valid integer"),
        ("bbox range", {}, {"bbox_shift": "101"}, "bbox_shift: Input should be less than or equal to 100"),
        ("unknown param", {}, {"bbox_shfit": "5"}, "Unknown form field 'bbox_shfit'"),
        ("bad wait", {}, {"wait": "maybe"}, "Invalid wait"),
    ],
)  # fmt: skip
def test_generate_rejects_bad_input(client, fake, media, case, files_kw, data, expect) -> None:
    names = {k: v for k, v in files_kw.items() if k.endswith("_name")}
    kinds = {k: v for k, v in files_kw.items() if not k.endswith("_name")}
    resp = client.post("/generate", files=_files(media, **kinds, **names), data=data)
    assert resp.status_code == 400, (case, resp.text)
    assert set(resp.json()) == {"error"}
    assert expect in resp.json()["error"], (case, resp.json())
    assert "input_" not in resp.json()["error"]  # the user's names, not ours
    assert len(fake.discarded) == 1
    _no_leftovers(fake)


def test_generate_missing_and_unknown_fields(client, fake, media) -> None:
    files = _files(media)
    resp = client.post("/generate", files={"video": files["video"]})
    assert resp.status_code == 400 and "'audio'" in resp.json()["error"]
    resp = client.post("/generate", files={"audio": files["audio"]})
    assert resp.status_code == 400 and "'video'" in resp.json()["error"]
    resp = client.post("/generate", files={"file": files["video"], "audio": files["audio"]})
    assert resp.status_code == 400 and "Unexpected file field 'file'" in resp.json()["error"]
    resp = client.post("/generate", files=[("video", files["video"]), ("video", files["video"])])
    assert resp.status_code == 400 and "more than once" in resp.json()["error"]
    assert len(fake.discarded) == 4
    _no_leftovers(fake)


def test_generate_non_multipart(client, fake) -> None:
    resp = client.post("/generate", json={"video": "a.mp4", "audio": "b.wav"})
    assert resp.status_code == 400 and "multipart/form-data" in resp.json()["error"]
    resp = client.post("/generate", content=b"video=x", headers={"content-type": "multipart/form-data"})
    assert resp.status_code == 400  # no boundary
    assert fake.new_upload_calls == 0


def test_generate_truncated_body(client, fake, media) -> None:
    boundary = "XyZ"
    body = _part_header(boundary, "video", "clip.mp4") + media["video"].read_bytes()[:500]
    resp = client.post("/generate", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 400 and "Incomplete" in resp.json()["error"]
    _no_leftovers(fake)


def test_generate_queue_full_and_storage(client, fake, media) -> None:
    fake.fail_new_upload = QueueFullError("Too many queued jobs; retry later", retry_after_s=17)
    resp = client.post("/generate", files=_files(media))
    assert resp.status_code == 429
    assert resp.headers["retry-after"] == "17"
    assert resp.json() == {"error": "Too many queued jobs; retry later"}
    fake.fail_new_upload = InsufficientStorageError("Not enough free disk space")
    resp = client.post("/generate", files=_files(media))
    assert resp.status_code == 507 and resp.json() == {"error": "Not enough free disk space"}


# --------------------------------------------------------------------------- 413


def _part_header(boundary: str, name: str, filename: str | None = None) -> bytes:
    disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_oversized_part_is_cut_off_while_streaming(fake, health, responses_seen) -> None:
    limit, chunk, total = 100 * 1024, 16_384, 600_000
    app = create_rest_app(fake, health, ApiLimits(max_video_bytes=limit, max_audio_bytes=limit))
    fake.keep_discarded_dirs = True  # so the test sees what the upload itself left behind
    boundary = "b0undary"
    observed: list[int] = []
    sent = 0

    async def body():
        nonlocal sent
        yield _part_header(boundary, "video", "big.mp4")
        while sent < total:
            # what is on disk now (the app read every earlier chunk before asking for this one)
            observed.append(sum(p.stat().st_size for p in fake.root.glob("*/input_video*")))
            sent += chunk
            yield b"\x00" * chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
        resp = await ac.post(
            "/generate", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
        )
    responses_seen.append(resp.content)
    assert resp.status_code == 413
    assert resp.json()["error"] == "File too large"
    assert "100 KB" in resp.json()["message"]
    assert max(observed) <= limit + chunk
    assert sent <= limit + 2 * chunk  # stopped reading the body
    (job_dir,) = fake.root.iterdir()
    assert list(job_dir.iterdir()) == []  # the partial file is gone
    assert fake.discarded == [job_dir.name] and fake.submitted == []


def test_content_length_over_limit_rejected_up_front(fake, health, responses_seen) -> None:
    limits = ApiLimits(max_video_bytes=1000, max_audio_bytes=1000)
    client = _client(create_rest_app(fake, health, limits), responses_seen)
    body = b"0" * (limits.max_request_bytes + 1)
    resp = client.post("/generate", content=body, headers={"content-type": "multipart/form-data; boundary=x"})
    assert resp.status_code == 413
    assert resp.json()["error"] == "File too large" and resp.json()["message"]
    assert fake.new_upload_calls == 0


@pytest.mark.anyio
async def test_middleware_cuts_off_chunked_body() -> None:
    read: list[int] = []

    async def echo(request: Request) -> JSONResponse:
        n = 0
        async for piece in request.stream():
            n += len(piece)
            read.append(n)
        return JSONResponse({"bytes": n})

    inner = Starlette(routes=[Route("/up", echo, methods=["POST"]), Route("/other", echo, methods=["POST"])])
    app = BodySizeLimitMiddleware(inner, max_bytes=10_000, paths_prefixes=("/up",))
    pulled = 0

    async def body():
        nonlocal pulled
        for _ in range(100):
            pulled += 1
            yield b"x" * 1000

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
        resp = await ac.post("/up", content=body())
        assert resp.status_code == 413 and resp.json()["error"] == "File too large"
        assert pulled <= 12 and max(read) <= 10_000
        pulled = 0
        resp = await ac.post("/other", content=body())
        assert resp.status_code == 200 and resp.json() == {"bytes": 100_000}
        resp = await ac.post("/up", content=b"y" * 10_000)
        assert resp.status_code == 200 and resp.json() == {"bytes": 10_000}


# --------------------------------------------------------------------------- status / download / jobs


def test_status_lifecycle(client, fake, media) -> None:
    job_id = _queued(client, media)
    resp = client.get(f"/status/{job_id}")
    assert resp.status_code == 200
    body = resp.json()
    assert body["job_id"] == job_id and body["status"] == "queued"
    assert TIME_RE.match(body["created_at"]) and TIME_RE.match(body["expires_at"])
    assert body["completed_at"] is None and body["output_path"] is None
    assert body["stage"] == "queued" and body["progress"] == 0.0 and body["error"] is None
    assert body["download_url"] == f"{PREFIX}/download/{job_id}"
    assert body["bbox_shift"] == 0 and body["attempts"] == 0 and body["timings"] == {} and body["frames"] is None

    fake.finish(job_id)
    body = client.get(f"/status/{job_id}").json()
    assert body["status"] == "completed" and body["progress"] == 1.0 and body["frames"] == 10
    assert TIME_RE.match(body["completed_at"])
    assert body["output_path"] == f"lip_sync_{job_id}.mp4"
    assert body["timings"] == {"total": 1.5}


def test_download(client, fake, media) -> None:
    job_id = _queued(client, media)
    resp = client.get(f"/download/{job_id}")
    assert resp.status_code == 409 and "queued" in resp.json()["error"]

    fake.finish(job_id)
    expected = (fake.root / job_id / "output.mp4").read_bytes()
    resp = client.get(f"/download/{job_id}")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "video/mp4"
    assert resp.headers["content-disposition"] == f'attachment; filename="lip_sync_{job_id}.mp4"'
    assert resp.content == expected
    resp = client.get(f"/download/{job_id}", headers={"Range": "bytes=4-11"})
    assert resp.status_code == 206 and resp.content == expected[4:12]


def test_cleanup_cancel_and_jobs(client, fake, media) -> None:
    a, b, c = (_queued(client, media) for _ in range(3))
    resp = client.post(f"/cancel/{b}")
    assert resp.status_code == 200
    assert resp.json()["job_id"] == b and resp.json()["status"] == "cancelled"
    assert TIME_RE.match(resp.json()["completed_at"])
    assert client.post(f"/cancel/{b}").status_code == 409

    resp = client.get("/jobs")
    assert resp.status_code == 200
    body = resp.json()
    assert body["total"] == 3 and {j["job_id"] for j in body["jobs"]} == {a, b, c}
    for job in body["jobs"]:
        assert set(job) == {"job_id", "status", "created_at", "completed_at", "stage", "progress", "inputs"}
        assert TIME_RE.match(job["created_at"])
    assert client.get("/jobs?limit=2").json()["total"] == 2
    for bad in ("0", "1001", "abc"):
        resp = client.get(f"/jobs?limit={bad}")
        assert resp.status_code == 400 and "limit" in resp.json()["error"]

    resp = client.delete(f"/cleanup/{a}")
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "job_id": a, "message": "Job files removed"}
    assert not (fake.root / a).exists()
    assert client.get(f"/status/{a}").status_code == 404
    assert client.get("/jobs").json()["total"] == 2


@pytest.mark.parametrize("job_id", ["3f2a9c1e-8b4d-4e6f-9a0b-1c2d3e4f5a6b", "abc", "..%2F..%2Fetc", "..%2F..%2Fetc%2Fpasswd", "%00"])
def test_unknown_and_malformed_ids_are_404(client, job_id) -> None:
    for method, route in (("GET", "status"), ("GET", "download"), ("DELETE", "cleanup"), ("POST", "cancel")):
        resp = client.request(method, f"/{route}/{job_id}")
        assert resp.status_code == 404, (method, route, resp.text)
        assert "error" in resp.json()


# --------------------------------------------------------------------------- errors


def test_unhandled_error_is_500_without_internals(fake, health, limits, responses_seen, media) -> None:
    client = _client(create_rest_app(fake, health, limits), responses_seen, raise_server_exceptions=False)
    job_id = _queued(client, media)
    fake.raise_on_get = RuntimeError(f"disk on fire at {fake.root}")
    resp = client.get(f"/status/{job_id}")
    assert resp.status_code == 500 and resp.json() == {"error": "Internal server error"}

    debug = TestClient(
        create_rest_app(fake, health, ApiLimits(), debug=True), raise_server_exceptions=False
    )
    fake.raise_on_get = RuntimeError("kaboom")
    resp = debug.get(f"/status/{job_id}")
    assert resp.status_code == 500 and resp.json()["error"] == "Internal server error"
    assert "kaboom" in resp.json()["traceback"]


def test_unknown_route_and_openapi(client) -> None:
    resp = client.get("/nope")
    assert resp.status_code == 404 and resp.json() == {"error": "Not found"}
    spec = client.get("/openapi.json").json()
    assert {"/health", "/generate", "/status/{job_id}", "/download/{job_id}", "/cleanup/{job_id}",
            "/cancel/{job_id}", "/jobs"} <= set(spec["paths"])  # fmt: skip
    assert "multipart/form-data" in spec["paths"]["/generate"]["post"]["requestBody"]["content"]
    assert "JobStatusResponse" in spec["components"]["schemas"]


def test_limits_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("LIP_SYNC_MAX_VIDEO_BYTES", "1234")
    monkeypatch.setenv("LIP_SYNC_DEBUG", "true")
    limits = ApiLimits()
    assert limits.max_video_bytes == 1234 and ServiceSettings().debug is True
    assert limits.max_audio_bytes == 100 * 1024 * 1024 and limits.wait_timeout_s == 3600


@pytest.mark.anyio
async def test_generate_refuses_unknown_and_oversized_fields_while_streaming(fake, health, responses_seen) -> None:
    limits = ApiLimits(max_video_bytes=1000, max_audio_bytes=1000)
    app = create_rest_app(fake, health, limits)
    boundary = "zz"
    pulled = 0

    def body(field: str):
        async def gen():
            nonlocal pulled
            yield _part_header(boundary, field)
            for _ in range(200):
                pulled += 1
                yield b"1" * 65536
        return gen()

    ctype = f"multipart/form-data; boundary={boundary}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
        # a field nobody reads (a typo of a parameter) is refused, not streamed to the end
        resp = await ac.post("/generate", content=body("comment"), headers={"content-type": ctype})
        responses_seen.append(resp.content)
        assert resp.status_code == 400 and "Unknown form field 'comment'" in resp.json()["error"]
        assert pulled <= 2
        # a known field is cut off at its own bound, far below the whole-body limit
        pulled = 0
        resp = await ac.post("/generate", content=body("bbox_shift"), headers={"content-type": ctype})
        responses_seen.append(resp.content)
        assert resp.status_code == 400 and "too long" in resp.json()["error"]
        assert pulled * 65536 <= 2 * 256 * 1024
    assert len(fake.discarded) == 2 and list(fake.root.iterdir()) == []


def test_ensure_ready_hook_refuses_uploads_with_503(fake, health, limits, responses_seen, media) -> None:
    async def not_ready() -> None:
        raise ModelsNotReadyError("models are still loading")

    client = _client(create_rest_app(fake, health, limits, ensure_ready=not_ready), responses_seen)
    resp = client.post("/generate", files=_files(media))
    assert resp.status_code == 503
    assert resp.json() == {"error": "Lip sync service not available", "details": "models are still loading"}
    assert fake.new_upload_calls == 0


@pytest.mark.anyio
async def test_middleware_path_prefixes_alias_and_mount() -> None:
    from starlette.routing import Mount

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"bytes": len(await request.body())})

    inner = BodySizeLimitMiddleware(Starlette(routes=[Route("/generate", echo, methods=["POST"])]), max_bytes=10,
                                    path_prefixes=("/generate",))  # fmt: skip
    app = Starlette(routes=[Mount("/api/lip-sync", app=inner)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as ac:
        assert (await ac.post("/api/lip-sync/generate", content=b"x" * 11)).status_code == 413
        assert (await ac.post("/api/lip-sync/generate", content=b"x" * 10)).json() == {"bytes": 10}


def test_plain_body_helpers(client, fake, media) -> None:
    job_id = _queued(client, media)
    record = fake.get(job_id)
    assert status_body(record) == client.get(f"/status/{job_id}").json()
    assert job_summary(record) == client.get("/jobs").json()["jobs"][0]


def test_a_missing_bbox_shift_takes_the_deployments_default(monkeypatch, fake, health, responses_seen, media):
    monkeypatch.setenv("LIP_SYNC_BBOX_SHIFT", "-7")
    client = _client(create_rest_app(fake, health, ApiLimits()), responses_seen)
    for data in ({}, {"bbox_shift": ""}, {"bbox_shift": "null"}, {"bbox_shift": "5"}):
        assert client.post("/generate", files=_files(media), data=data).status_code == 202
    assert [s["params"].bbox_shift for s in fake.submitted] == [-7, -7, -7, 5]


# ------------------------------------------------------------------ the document matches behaviour (issue 24)


def test_a_track_id_no_video_can_have_is_refused_at_admission(client, fake, media) -> None:
    r = client.post("/generate", files=_files(media), data={"face": "1" * 29})
    assert r.status_code == 400 and "face" in r.json()["error"]
    assert fake.submitted == []  # refused before any job was made, not after tracking


def test_an_empty_webhook_events_list_is_refused_by_the_document_too(client) -> None:
    found = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict) and "webhook_events" in node["properties"]:
                found.append(node["properties"]["webhook_events"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(client.get("/openapi.json").json())
    assert found and all(e.get("minItems") == 1 for e in found), found
    assert client.post("/generate", json={"video_url": "https://example.com/a.mp4", "audio_url":
                       "https://example.com/a.wav", "webhook_url": "https://example.com/h",
                       "webhook_events": []}).status_code == 400


@pytest.mark.parametrize("query", ["until=0", "since=1", "until=2026-13-01", "since=20260101"])
def test_usage_days_are_read_only_as_calendar_days(client, query) -> None:
    r = client.get(f"/usage?{query}")
    assert r.status_code == 400, r.text  # FastAPI's date would read `0` as a Unix time: 1970-01-01


def test_usage_documents_its_404(client) -> None:
    assert "404" in client.get("/openapi.json").json()["paths"]["/usage"]["get"]["responses"]
