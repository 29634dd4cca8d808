"""POST /api/lip-sync/preview (issue 23, item 2): a short stretch of what generate would make, at once.

The service in process (ServiceCore over a runner with the tiny random-weight models, as in
tests/test_avatars.py), called through its REST app and through the SDK's async client.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from lipsync_client import AsyncLipSyncClient, BadRequest, Preview, TooManyRequests
from lipsync_runner.api.rest import create_rest_app
from lipsync_runner.config import ApiLimits, RunnerSettings, ServiceSettings, Settings
from lipsync_runner.media.ffmpeg import VideoReader
from lipsync_runner.serving.core import ServiceCore
from lipsync_runner.serving.preview import STRIP_HEIGHT
from lipsync_runner.serving.runner import RunnerCore

pytestmark = pytest.mark.anyio
FPS = 25
STRETCH_S = 0.4  # the deployment's preview length here: 10 frames (the tiny model's time on CPU)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict[str, Path]:
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    root = tmp_path_factory.mktemp("preview-media")
    return {"video": write_face_video(root / "face.mp4", seconds=1.6, fps=FPS, size=(320, 240)),
            "audio": write_speech_like_audio(root / "speech.wav", seconds=1.6)}


@pytest.fixture(scope="module")
def core(tmp_path_factory, models_dir, model):
    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.model, runner.state = model, "ready"
    data = tmp_path_factory.mktemp("preview-service")
    api = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=data, job_workers=1, free_space_floor_mb=0, chunk_frames=2,
                                preview_seconds=STRETCH_S, max_concurrent_previews=1),
        # crf 0: x264 lossless, so decoded frames are the rendered ones (bar the one RGB -> YUV 4:2:0
        # conversion, the same per frame for both): a preview and a job compare frame for frame
        runner=RunnerSettings(device="cpu", models_dir=models_dir, crf=0)))
    api.start(None)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def app(core):
    rest = create_rest_app(None, None, ApiLimits())
    rest.state.operations, rest.state.health = core.operations, core.health
    return rest


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/", timeout=120)


def upload(clip: dict[str, Path], *names: str) -> dict:
    return {name: (clip[name].name, clip[name].read_bytes()) for name in names}


def frames_of(data: bytes, tmp: Path) -> np.ndarray:
    tmp.write_bytes(data)
    with VideoReader(tmp) as reader:
        return np.stack(list(reader))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def stretch(response: httpx.Response) -> tuple[float, float]:
    parts = dict(p.split("=") for p in response.headers["x-lip-sync-preview"].split(";"))
    return float(parts["start"]), float(parts["end"])


async def test_a_preview_is_the_jobs_own_stretch_and_the_job_after_it_does_not_track_again(app, clip, tmp_path):
    params = {"silence": "generate"}
    async with client(app) as c:
        shown = await c.post("/preview", data={**params, "at": "0.4"}, files=upload(clip, "video", "audio"))
        assert shown.status_code == 200, shown.text
        assert shown.headers["content-type"] == "video/mp4"
        assert stretch(shown) == (0.4, 0.8)
        faces = json.loads(shown.headers["x-lip-sync-faces"])
        assert faces["count"] == 1 and len(faces["chosen"]) == 1 and faces["frames"] == 40
        assert " " not in shown.headers["x-lip-sync-faces"]  # compact JSON

        job = await c.post("/generate", params={"wait": "true"}, data=params, files=upload(clip, "video", "audio"))
        assert job.status_code == 200 and job.json()["success"], job.text
        status = (await c.get(f"/status/{job.json()['job_id']}")).json()
        # the preview left the face track in the avatar cache: the job found it there
        assert status["avatar_cache"] == "hit" and "faces" not in status["timings"], status["timings"]
        assert status["faces"] == faces  # the same summary the preview's header gave
        full = frames_of((await c.get(f"/download/{status['job_id']}")).content, tmp_path / "full.mp4")

    preview = frames_of(shown.content, tmp_path / "preview.mp4")
    source = frames_of(clip["video"].read_bytes(), tmp_path / "source.mp4")
    assert preview.shape == (10, 240, 320, 3)
    np.testing.assert_array_equal(preview, full[10:20])  # output frames 10..19, frame for frame
    assert psnr(full[15], source[15]) < 40  # and a dubbed stretch, not the source


async def test_a_jpeg_strip_starts_where_the_dubbing_starts_by_default(app, clip):
    segments = json.dumps([{"start": 1.0, "end": 1.4}])
    async with client(app) as c:
        shown = await c.post("/preview", data={"segments": segments, "silence": "generate"},
                             files=upload(clip, "video", "audio"), headers={"Accept": "image/jpeg"})
    assert shown.status_code == 200, shown.text
    assert shown.headers["content-type"] == "image/jpeg"
    assert stretch(shown) == (1.0, 1.4)  # the first generated frame: the segment's start
    strip = cv2.imdecode(np.frombuffer(shown.content, np.uint8), cv2.IMREAD_COLOR)
    tile = round(320 * STRIP_HEIGHT / 240)
    assert strip.shape == (STRIP_HEIGHT, 10 * tile, 3)  # ten frames side by side


async def test_a_preview_is_refused_as_generate_is(app, core, clip):
    async with client(app) as c:
        cases = [
            ({"at": "9"}, ("video", "audio"), "at: 9 s is past the end of the output"),
            ({"at": "-1"}, ("video", "audio"), "at: -1 must be between 0"),
            ({"at": "soon"}, ("video", "audio"), "at: 'soon' is not a number"),
            ({"sync_mode": "stretch"}, ("video", "audio"), "sync_mode: Input should be"),
            ({"segments": '[{"start": 0, "end": 1, "face": "bob"}]'}, ("video", "audio"), "segments.0.face"),
            ({}, ("video",), "Missing required file field(s): 'audio'"),
            ({"video_url": "https://example.com/v.mp4"}, ("audio",), "video_url: a preview takes uploaded files"),
        ]
        for fields, files, message in cases:
            answer = await c.post("/preview", data=fields, files=upload(clip, *files))
            assert answer.status_code == 400 and message in answer.json()["error"], (fields, answer.text)

        with core.previewer.slot():  # every preview slot taken (here: one)
            busy = await c.post("/preview", files=upload(clip, "video", "audio"))
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1, busy.text


async def test_a_preview_is_no_job_and_takes_no_place_in_the_queue(app, core, clip):
    async with client(app) as c:
        before = (await c.get("/jobs")).json()["jobs"]
        shown = await c.post("/preview", data={"at": "0"}, files=upload(clip, "video", "audio"))
        assert shown.status_code == 200, shown.text
        assert (await c.get("/jobs")).json()["jobs"] == before
    assert not any(core.previewer.root.iterdir())  # its scratch is gone with the answer


async def test_the_sdk_preview_returns_the_bytes_and_the_faces(app, core, clip, tmp_path):
    async with AsyncLipSyncClient("http://t", api_prefix="", transport=httpx.ASGITransport(app=app),
                                  timeout=120) as sdk:
        shown = await sdk.preview(clip["video"], clip["audio"], at=0.8, silence="generate")
        assert isinstance(shown, Preview) and shown.media_type == "video/mp4"
        assert (shown.start, shown.end) == (0.8, 1.2) and shown.faces["count"] == 1
        assert frames_of(shown.content, tmp_path / "p.mp4").shape == (10, 240, 320, 3)
        strip = await sdk.preview(clip["video"], clip["audio"], at=0.8, image=True)
        assert strip.media_type == "image/jpeg" and strip.content[:2] == b"\xff\xd8"
        with pytest.raises(BadRequest, match="sync_mode"):
            await sdk.preview(clip["video"], clip["audio"], sync_mode="stretch")
        with core.previewer.slot(), pytest.raises(TooManyRequests) as busy:
            await sdk.preview(clip["video"], clip["audio"])
        assert busy.value.retry_after >= 1


@pytest.fixture(scope="module")
def server(app):
    """The same app on a loopback port, for the synchronous SDK and the `lipsync` command."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from .loopback_http import serve_asgi

    with serve_asgi(Starlette(routes=[Mount("/api/lip-sync", app=app)])) as url:  # where the clients look
        yield url


def test_lipsync_preview_writes_the_stretch_and_prints_the_faces(server, clip, tmp_path, capsys):
    from lipsync_client import LipSyncClient, cli

    with LipSyncClient(server) as sdk:  # the synchronous client
        shown = sdk.preview(clip["video"], clip["audio"], at=0.4, silence="generate")
        assert (shown.start, shown.end) == (0.4, 0.8) and shown.faces["count"] == 1

    out = tmp_path / "strip.jpg"  # a .jpg name asks for the strip
    code = cli.main(["--server", server, "preview", str(clip["video"]), str(clip["audio"]), "-o", str(out),
                     "--at", "0.4", "--silence", "generate", "-q"])
    assert code == 0 and out.read_bytes()[:2] == b"\xff\xd8"
    assert json.loads(capsys.readouterr().out) == shown.faces
    code = cli.main(["--server", server, "preview", str(clip["video"]), str(clip["audio"]), "--sync-mode", "x"])
    assert code == 2  # refused by the schema before any upload
