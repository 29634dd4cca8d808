"""The one admission path: uploads that crawl, stall, crowd out other clients or fill the disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from lipsync_runner.config import ApiLimits
from lipsync_runner.api import create_rest_app
from lipsync_runner.errors import InsufficientStorageError

from .test_rest_api import FakeManager, _files, _part_header, media  # noqa: F401 - the media fixture

pytestmark = pytest.mark.anyio
BOUNDARY = "b0undary"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake(tmp_path: Path) -> FakeManager:
    (tmp_path / "jobs").mkdir()
    return FakeManager(tmp_path / "jobs")


async def _health() -> dict:
    return {"status": "ready", "models_loaded": True}


def _client(app, address: str = "10.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 5000)), base_url="http://t")


def _multipart(media, *, pause: asyncio.Event | None = None, delay_s: float = 0.0, chunk: int = 4096):
    """The two files as one multipart body, sent in small chunks (optionally held or slowed)."""
    video, audio = media["video"].read_bytes(), media["audio"].read_bytes()

    async def body():
        yield _part_header(BOUNDARY, "video", "clip.mp4")
        for i in range(0, len(video), chunk):
            if pause is not None and i > 0:
                await pause.wait()
            if delay_s:
                await asyncio.sleep(delay_s)
            yield video[i:i + chunk]
        yield b"\r\n" + _part_header(BOUNDARY, "audio", "speech.wav") + audio + f"\r\n--{BOUNDARY}--\r\n".encode()

    return body()


async def test_a_stalled_upload_is_cut_off_and_frees_its_slot(fake, media):
    app = create_rest_app(fake, _health, ApiLimits(upload_idle_timeout_s=0.5))
    never = asyncio.Event()
    async with _client(app) as c:
        resp = await c.post("/generate", content=_multipart(media, pause=never), headers={"content-type": CTYPE})
        assert resp.status_code == 408 and "no data for 0.5 s" in resp.json()["error"]
        assert fake.discarded and list(fake.root.iterdir()) == []
        # the slot is free again: the same client gets in at once
        resp = await c.post("/generate", files=_files(media))
        assert resp.status_code == 202, resp.text


async def test_an_upload_below_the_minimum_rate_is_cut_off(fake, media):
    limits = ApiLimits(upload_rate_grace_s=0.3, upload_min_bytes_per_s=1_000_000)
    app = create_rest_app(fake, _health, limits)
    async with _client(app) as c:  # about 5 KB/s: far too slow
        resp = await c.post("/generate", content=_multipart(media, delay_s=0.1, chunk=512), headers={"content-type": CTYPE})
    assert resp.status_code == 408 and "Upload too slow" in resp.json()["error"]
    assert fake.submitted == [] and list(fake.root.iterdir()) == []


async def test_one_client_cannot_take_every_upload_slot(fake, media):
    """A client's slow uploads get it 429s; everyone else still gets in."""
    app = create_rest_app(fake, _health, ApiLimits(max_uploads_per_client=2, max_concurrent_uploads=10))
    hold = asyncio.Event()
    async with _client(app, "10.0.0.1") as greedy, _client(app, "10.0.0.2") as other:
        slow = [asyncio.create_task(greedy.post("/generate", content=_multipart(media, pause=hold),
                                                headers={"content-type": CTYPE})) for _ in range(2)]
        while len(fake.uploads) < 2:  # both slow uploads hold a slot
            await asyncio.sleep(0.01)
        refused = await greedy.post("/generate", files=_files(media))
        assert refused.status_code == 429 and "from this client" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) > 0
        assert (await other.post("/generate", files=_files(media))).status_code == 202
        hold.set()
        assert [(await t).status_code for t in slow] == [202, 202]


async def test_uploads_in_progress_are_bounded_in_all(fake, media):
    app = create_rest_app(fake, _health, ApiLimits(max_uploads_per_client=5, max_concurrent_uploads=2))
    hold = asyncio.Event()
    async with _client(app, "10.0.0.1") as a, _client(app, "10.0.0.2") as b, _client(app, "10.0.0.3") as c:
        slow = [asyncio.create_task(x.post("/generate", content=_multipart(media, pause=hold),
                                           headers={"content-type": CTYPE})) for x in (a, b)]
        while len(fake.uploads) < 2:
            await asyncio.sleep(0.01)
        refused = await c.post("/generate", files=_files(media))
        assert refused.status_code == 429 and "uploads already" in refused.json()["error"]
        hold.set()
        await asyncio.gather(*slow)


async def test_free_space_is_checked_again_while_an_upload_streams(fake, media, monkeypatch):
    """Parallel uploads cannot fill the disk under running jobs: the floor is re-checked per 8 MB."""
    checks = []

    def check_free_space() -> None:
        checks.append(1)
        if len(checks) >= 2:
            raise InsufficientStorageError("the server is low on disk space")

    monkeypatch.setattr(fake, "check_free_space", check_free_space)
    app = create_rest_app(fake, _health, ApiLimits(max_video_bytes=64 * 2**20))

    async def body():
        yield _part_header(BOUNDARY, "video", "big.mp4")
        for _ in range(40):  # 40 MB of video, never completed
            yield b"\0" * 2**20

    async with _client(app) as c:
        resp = await c.post("/generate", content=body(), headers={"content-type": CTYPE})
    assert resp.status_code == 507 and resp.json() == {"error": "the server is low on disk space"}
    assert len(checks) == 2 and list(fake.root.iterdir()) == []


async def test_files_handed_over_in_process_go_through_the_same_checks(fake, media, tmp_path):
    """`generate` called in process (no HTTP) uses admit_files: same params, checks and bodies."""
    from lipsync_runner.api.operations import JobOperations

    ops = JobOperations(fake, ApiLimits())
    answer = await ops.admission.admit_files(media["video"], media["audio"], {"bbox_shift": 3}, owner=None)
    assert answer.status_code == 202 and answer.body["status"] == "queued"
    assert fake.submitted[-1]["params"].bbox_shift == 3
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 10)
    from lipsync_runner.errors import InvalidInputError
    with pytest.raises(InvalidInputError, match="notes.mp4"):
        await ops.admission.admit_files(text, media["audio"], {}, owner=None)
    with pytest.raises(InvalidInputError, match="bbox_shift"):
        await ops.admission.admit_files(media["video"], media["audio"], {"bbox_shift": "up"}, owner=None)
