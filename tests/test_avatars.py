"""Avatars (issue 14 item 6): a video prepared once, then dubbed by `avatar_id`.

The service core runs in process (runner and API in one process, the tiny random-weight
models), behind the real REST app and the real token middleware with jobs scoped per token,
so owner scoping is the product's. The clip is short (10 frames) and the dubbed stretch is a
segment of 3 frames, to keep the model's work small.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from lipsync_runner.config import ApiLimits
from lipsync_runner.api import create_rest_app
from lipsync_runner.config import AuthSettings
from lipsync_runner.api.auth import BearerAuthMiddleware, owner_of
from lipsync_runner.pipeline.avatar_cache import AvatarCache
from lipsync_runner.errors import AvatarNotFoundError
from lipsync_runner.faces import FaceTrack
from lipsync_runner.jobs import JobKind, JobRecord, SQLiteJobStore
from lipsync_runner.jobs.records import utcnow
from lipsync_runner.media.ffmpeg import VideoReader
from lipsync_runner.serving.core import ServiceCore
from lipsync_runner.config import OutboundSettings, Settings
from lipsync_runner.serving.runner import RunnerCore
from lipsync_runner.config import ServiceSettings
from lipsync_runner.serving.signature import job_params_signature
from lipsync_runner.config import RunnerSettings

from .loopback_http import LoopbackServer, Reply

pytestmark = pytest.mark.anyio
A, B = {"Authorization": "Bearer tok-a"}, {"Authorization": "Bearer tok-b"}
# the job both ways: a dubbed stretch of 3 frames, every frame in it generated
DUB = {"segments": json.dumps([{"start": 0.0, "end": 0.12}]), "silence": "generate"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict[str, Path]:
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    root = tmp_path_factory.mktemp("avatar-media")
    return {"video": write_face_video(root / "face.mp4", seconds=0.4, fps=25, size=(320, 240)),
            "audio": write_speech_like_audio(root / "fr.wav", seconds=0.4)}


@pytest.fixture(scope="module")
def core(tmp_path_factory, models_dir, model):
    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.model, runner.state = model, "ready"
    data = tmp_path_factory.mktemp("avatar-service")
    api = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=data, job_workers=1, free_space_floor_mb=0, chunk_frames=2),
        runner=RunnerSettings(device="cpu", models_dir=models_dir), outbound=OutboundSettings(url_allowlist="127.0.0.1")))
    api.start(None)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def app(core):
    rest = create_rest_app(None, None, ApiLimits())
    rest.state.operations, rest.state.health = core.operations, core.health
    return BearerAuthMiddleware(rest, AuthSettings(api_tokens="tok-a,tok-b", scope_jobs_to_token=True))


def client(app, headers: dict[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/", headers=headers,
                             timeout=120)


async def until_finished(c: httpx.AsyncClient, path: str, timeout: float = 120) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        body = (await c.get(path)).json()
        if body["status"] in ("completed", "failed", "cancelled") or loop.time() > deadline:
            return body
        await asyncio.sleep(0.1)


def frames_of(data: bytes, tmp: Path) -> np.ndarray:
    tmp.write_bytes(data)
    with VideoReader(tmp) as reader:
        return np.stack(list(reader))


def upload(clip: dict[str, Path], *names: str) -> dict:
    return {name: (clip[name].name, clip[name].read_bytes()) for name in names}


# --------------------------------------------------------------------------- prepared once, dubbed many


async def test_a_generate_by_avatar_id_equals_the_uploaded_video_job_without_tracking_or_encoding(
        app, core, clip, tmp_path):
    async with client(app, A) as a, client(app, B) as b:
        created = await a.post("/avatars", files=upload(clip, "video"))
        assert created.status_code == 202, created.text
        avatar_id = created.json()["avatar_id"]
        assert created.headers["location"].endswith(f"/avatars/{avatar_id}")
        avatar = await until_finished(a, f"/avatars/{avatar_id}")
        assert avatar["status"] == "completed" and avatar["ready"], avatar
        assert avatar["frames"] == 10 and avatar["video"]["filename"] == "face.mp4"
        assert {"faces", "prepare"} <= set(avatar["timings"])  # the preparation is where tracking and VAE run
        assert [x["avatar_id"] for x in (await a.get("/avatars")).json()["avatars"]] == [avatar_id]

        by_avatar = await a.post("/generate", params={"wait": "true"},
                                 data={"avatar_id": avatar_id, **DUB}, files=upload(clip, "audio"))
        assert by_avatar.status_code == 200 and by_avatar.json()["success"], by_avatar.text
        dubbed = (await a.get(f"/status/{by_avatar.json()['job_id']}")).json()
        # the job's own timings: no face tracking, no VAE encoding; the latents were read from the avatar
        assert "faces" not in dubbed["timings"] and "prepare" not in dubbed["timings"], dubbed["timings"]
        assert "cache" in dubbed["timings"] and dubbed["avatar_cache"] == "hit"
        assert dubbed["inputs"]["video_source"] == "avatar" and dubbed["params"]["avatar_id"] == avatar_id

        # the same job with the video uploaded, by another tenant (its own, cold cache entry)
        uploaded = await b.post("/generate", params={"wait": "true"}, data=DUB, files=upload(clip, "video", "audio"))
        assert uploaded.status_code == 200 and uploaded.json()["success"], uploaded.text
        plain = (await b.get(f"/status/{uploaded.json()['job_id']}")).json()
        assert {"faces", "prepare"} <= set(plain["timings"]) and plain["avatar_cache"] == "miss"

        ours = frames_of((await a.get(f"/download/{dubbed['job_id']}")).content, tmp_path / "a.mp4")
        theirs = frames_of((await b.get(f"/download/{plain['job_id']}")).content, tmp_path / "b.mp4")
        assert ours.shape == theirs.shape == (10, 240, 320, 3)
        np.testing.assert_array_equal(ours, theirs)  # frame for frame
        # the avatar's video plays back through the job's inputs, like an upload
        video = await a.get(f"/jobs/{dubbed['job_id']}/inputs/video")
        assert video.status_code == 200 and video.content == clip["video"].read_bytes()

        # each use keeps the avatar for another retention period; past it, the avatar and its entry go
        record = core.manager.get(avatar_id)
        assert record.expires_at > utcnow() + timedelta(seconds=core.settings.service.retention_s - 60)
        entry = _entry_of(core.avatars, avatar_id)
        assert entry.is_dir()
        core.manager.sweep(now=record.expires_at + timedelta(seconds=1))
        assert (await a.get(f"/avatars/{avatar_id}")).status_code == 404
        assert not entry.exists()  # released although the dubbed job had used it too
        gone = await a.post("/generate", data={"avatar_id": avatar_id}, files=upload(clip, "audio"))
        assert (gone.status_code, gone.json()) == (404, {"error": "Avatar not found"})


def _entry_of(cache: AvatarCache, avatar_id: str) -> Path:
    (pin,) = cache.root.glob(f"*/pins/{avatar_id}")
    return pin.parent.parent


# --------------------------------------------------------------------------- owner scoping, readiness, delete


def entries(cache: AvatarCache) -> set[str]:
    return {p.name for p in cache.root.iterdir() if (p / "meta.json").is_file()}


async def test_avatars_are_their_owners_and_must_be_ready_and_delete_cancels_and_releases(app, core, clip):
    before = entries(core.avatars)
    async with client(app, A) as a, client(app, B) as b:
        avatar_id = (await a.post("/avatars", files=upload(clip, "video"))).json()["avatar_id"]
        # straight away it is still being prepared: generate is 409 with a time to come back
        early = await a.post("/generate", data={"avatar_id": avatar_id}, files=upload(clip, "audio"))
        assert early.status_code == 409 and "not ready yet" in early.json()["error"], early.text
        assert int(early.headers["retry-after"]) >= 1

        # another token sees nothing of it
        assert (await b.get(f"/avatars/{avatar_id}")).status_code == 404
        assert avatar_id not in {x["avatar_id"] for x in (await b.get("/avatars")).json()["avatars"]}
        stolen = await b.post("/generate", data={"avatar_id": avatar_id}, files=upload(clip, "audio"))
        assert (stolen.status_code, stolen.json()) == (404, {"error": "Avatar not found"})
        assert (await b.delete(f"/avatars/{avatar_id}")).status_code == 404
        # nor through BentoML's generate (its signature has avatar_id; in process it admits files as here)
        with pytest.raises(AvatarNotFoundError):
            await core.operations.admission.admit_files(None, clip["audio"], {"avatar_id": avatar_id},
                                                        owner=owner_of("tok-b"))
        assert "avatar_id" in inspect.signature(job_params_signature(object)(lambda self, **kw: None)).parameters
        # and an avatar is not a job (nor a job an avatar)
        assert (await a.get(f"/status/{avatar_id}")).status_code == 404
        assert (await a.delete(f"/cleanup/{avatar_id}")).status_code == 404
        assert avatar_id not in {j["job_id"] for j in (await a.get("/jobs")).json()["jobs"]}

        # inputs that do not fit an avatar, or a generate by one, are refused at once
        both = await a.post("/generate", data={"avatar_id": avatar_id}, files=upload(clip, "video", "audio"))
        assert both.status_code == 400 and "avatar_id or a 'video' file" in both.json()["error"]
        other = await a.post("/avatars", data={"sync_mode": "loop"}, files=upload(clip, "video"))
        assert other.status_code == 400 and "sync_mode: not a parameter of an avatar" in other.json()["error"]
        speaker = await a.post("/avatars", data={"face": "speaker"}, files=upload(clip, "video"))
        assert speaker.status_code == 400 and "an avatar has none" in speaker.json()["error"]  # it picks by audio
        audio = await a.post("/avatars", files=upload(clip, "video", "audio"))
        assert audio.status_code == 400 and "leave the audio out" in audio.json()["error"]

        # delete while it is being prepared: cancelled, removed, and its cache entry released
        assert core.manager.get(avatar_id).status.value in ("queued", "processing")
        deleted = await a.delete(f"/avatars/{avatar_id}")
        assert deleted.status_code == 200 and deleted.json()["avatar_id"] == avatar_id
        assert (await a.get(f"/avatars/{avatar_id}")).status_code == 404
        for _ in range(300):  # the worker lets go of it within a chunk
            if not core.manager._running:
                break
            await asyncio.sleep(0.1)
        assert entries(core.avatars) == before and not core.files.job_dir(avatar_id).exists()


async def test_a_new_avatar_is_refused_with_507_when_the_avatars_kept_fill_the_cache(app, core, clip, monkeypatch):
    """Avatars' entries are never evicted, so once they fill LIP_SYNC_AVATAR_CACHE_GB a new one is refused
    before its upload is read: nothing stored, the key free. Entries of plain jobs do not count (LRU)."""
    build_entry(core.avatars, "kept-avatar", job_id="kept-avatar-id", pin=True)
    build_entry(core.avatars, "plain-job", job_id="plain-job-id")
    try:
        monkeypatch.setattr(core.avatars, "max_bytes", core.avatars.pinned_bytes() + 1)
        core.avatars.check_room_for_avatar()  # the plain entry pushes the cache over its bound: still room
        monkeypatch.setattr(core.avatars, "max_bytes", core.avatars.pinned_bytes())
        jobs_before = set(core.files.root.iterdir())
        async with client(app, A) as a:
            listed = {x["avatar_id"] for x in (await a.get("/avatars")).json()["avatars"]}
            full = await a.post("/avatars", files=upload(clip, "video"), headers={"Idempotency-Key": "avatar-full"})
            assert full.status_code == 507, full.text
            assert "fill the avatar cache" in full.json()["error"] and "delete avatars" in full.json()["error"]
            assert {x["avatar_id"] for x in (await a.get("/avatars")).json()["avatars"]} == listed
        assert set(core.files.root.iterdir()) == jobs_before
        assert core.manager.store.uploads() == set() and not core.manager._uploads
        retry = core.integration.keys.reserve(owner_of("tok-a"), "avatar-full")
        assert retry.owned  # the key was released: the same request may come back later
        core.integration.keys.release(retry)
    finally:
        core.avatars.release_job("kept-avatar-id")
        core.avatars.release_job("plain-job-id")


# --------------------------------------------------------------------------- storage


def build_entry(cache: AvatarCache, key: str, *, job_id: str, pin: bool = False) -> None:
    track = FaceTrack(boxes=np.zeros((4, 4), np.int32), landmarks=None, has_face=np.ones(4, bool), detector="haar")
    with cache.open(key, lambda: track, job_id=job_id, pin=pin):
        pass


def test_an_avatars_entry_is_never_evicted_or_aged_out_and_goes_with_the_avatar(tmp_path):
    cache = AvatarCache(tmp_path / "cache", max_bytes=10**9)
    build_entry(cache, "avatar-entry", job_id="avatar-1", pin=True)
    build_entry(cache, "plain-entry", job_id="job-1")
    (cache.root / "avatar-entry" / "jobs" / "job-2").touch()  # a job dubbed it
    cache.max_bytes = 1  # everything is over the bound
    assert cache.evict() == ["plain-entry"]
    assert cache.expire(0.0) == []  # not used for ages, still there: its avatar lives
    assert cache.release_job("job-2") == []  # a job's cleanup does not take an avatar's data
    assert cache.release_job("avatar-1") == ["avatar-entry"]  # the avatar's does
    build_entry(cache, "left-behind", job_id="avatar-2", pin=True)  # its record went in a crash
    assert cache.expire(0.0, live=lambda avatar_id: avatar_id != "avatar-2") == ["left-behind"]


def test_an_older_job_database_gains_the_kind_column_and_its_records_stay_jobs(tmp_path):
    db = tmp_path / "jobs.sqlite3"
    record = JobRecord(job_id="4b8a57a0-8c2f-4a5e-9c3e-0e6f8e9d2a11", video_filename="v.mp4", audio_filename="a.wav",
                       video_file="input_video.mp4", audio_file="input_audio.wav")
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE jobs (job_id TEXT PRIMARY KEY, status TEXT NOT NULL, owner TEXT, created_at REAL NOT NULL,
                           expires_at REAL, body TEXT NOT NULL);
        PRAGMA user_version = 1;
    """)
    body = json.loads(record.model_dump_json())
    del body["kind"]  # written before avatars existed
    conn.execute("INSERT INTO jobs VALUES (?, 'queued', NULL, 0, NULL, ?)", (record.job_id, json.dumps(body)))
    conn.commit()
    conn.close()
    store = SQLiteJobStore(db)
    assert store.schema_version == 4
    assert store.get(record.job_id).kind is JobKind.job
    assert [r.job_id for r in store.list(kind=JobKind.job)] == [record.job_id] and store.list(kind=JobKind.avatar) == []
    store.close()


# --------------------------------------------------------------------------- the SDK and the lipsync CLI


@pytest.fixture(scope="module")
def server(app):
    """The same app on a loopback port, for the synchronous SDK and the `lipsync` command."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from .loopback_http import serve_asgi

    with serve_asgi(Starlette(routes=[Mount("/api/lip-sync", app=app)])) as url:  # where the clients look
        yield url


def test_the_sdk_and_the_cli_create_list_use_and_delete_avatars(server, clip, tmp_path, capsys):
    from lipsync_client import AvatarNotReady, BadRequest, LipSyncClient, NotFound, cli

    with LipSyncClient(server, token="tok-a") as sdk:
        pending = sdk.create_avatar(clip["video"], bbox_shift=3)
        with pytest.raises(AvatarNotReady, match="not ready yet"):  # straight away: still being prepared
            sdk.generate(avatar_id=pending.avatar_id, audio=clip["audio"])
        ready = sdk.wait_avatar(pending.avatar_id, timeout=120)
        assert ready.ready and ready.frames == 10 and ready.params["bbox_shift"] == 3
        assert ready.faces["count"] == 1  # who is in it, for a face choice
        assert pending.avatar_id in {a.avatar_id for a in sdk.avatars().avatars}
        with pytest.raises(BadRequest, match="prepared with bbox_shift=3"):  # every generate by it uses 3
            sdk.generate(avatar_id=pending.avatar_id, audio=clip["audio"], bbox_shift=4)
        assert sdk.delete_avatar(pending.avatar_id).avatar_id == pending.avatar_id
        with pytest.raises(NotFound):
            sdk.avatar(pending.avatar_id)

    common = ["--server", server, "--token", "tok-a", "-q"]
    with LoopbackServer() as files:  # the platform's bucket (allow-listed loopback): the worker fetches it
        files.routes["/in/face.mp4"] = lambda req: Reply(200, {"Content-Type": "video/mp4"}, clip["video"].read_bytes())
        assert cli.main(["avatar", "create", "--video-url", files.url("/in/face.mp4"), *common]) == cli.OK
    avatar_id = capsys.readouterr().out.strip()  # printed once ready
    assert cli.main(["avatar", "status", avatar_id, "--json", *common]) == cli.OK
    assert json.loads(capsys.readouterr().out)["video"] == {
        "filename": "face.mp4", "source": "url", "duration_s": 0.4, "width": 320, "height": 240, "fps": "25/1"}
    assert cli.main(["avatar", "list", *common]) == cli.OK
    assert avatar_id in capsys.readouterr().out
    out = tmp_path / "fr.mp4"
    assert cli.main(["generate", "--avatar-id", avatar_id, str(clip["audio"]), "-o", str(out), *common,
                     "--segments", DUB["segments"], "--silence", "generate"]) == cli.OK
    assert capsys.readouterr().out.strip() == str(out.resolve()) and out.stat().st_size > 0
    assert cli.main(["avatar", "delete", avatar_id, *common]) == cli.OK
    assert cli.main(["avatar", "status", avatar_id, *common]) == cli.NOT_FOUND
    assert "Avatar not found" in capsys.readouterr().err
    # the video from two places is a usage error before any request
    assert cli.main(["generate", "--avatar-id", avatar_id, str(clip["video"]), str(clip["audio"]), *common]) == \
        cli.BAD_INPUT
