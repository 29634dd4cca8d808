"""Stored files are never served as a page (issue 24, item 4).

Each test builds its own hostile upload: a valid MP4 named ``clip.html`` with a ``<script>`` in its
metadata, a WAV named ``voice.svg``. The REST app over the fake job manager (tests/test_rest_api.py)
admits them with the real content checks, then serves them from a local file (FileResponse) and as
a bucket object streamed through the replica; headless Chromium opens the HTML-named one from a
live server and the script must not run.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from lipsync_runner.api import create_rest_app
from lipsync_runner.config import ApiLimits
from lipsync_runner.media.ffmpeg import ffmpeg_exe
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
from lipsync_runner.storage import object_response
from lipsync_runner.storage.local import LocalObject

from .test_rest_api import FakeManager, Health

PREFIX = "/api/lip-sync"
RAN = "script ran"
# If the MP4 is ever rendered as HTML this runs in the service's origin and reads the jobs list
# (its start closes whatever tag or attribute the binary before it opened).
SCRIPT = (f"\"'><script>document.title='{RAN}';fetch('{PREFIX}/jobs').then(r => r.text())"
          ".then(t => { document.title = 'leaked ' + t.length; })</script>")
CSP_SANDBOX = "sandbox; default-src 'none'"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``clip.html``: a real MP4 whose title is a script; ``voice.svg``: a real WAV."""
    root = tmp_path_factory.mktemp("hostile")
    face = write_face_video(root / "face.mp4", seconds=0.4, fps=10, size=(64, 64))
    clip = root / "clip.html"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(face), "-c", "copy",
                    "-metadata", f"title={SCRIPT}", "-f", "mp4", str(clip)], check=True)
    assert SCRIPT.encode() in clip.read_bytes()  # the hostile part really is in the file
    voice = root / "voice.svg"
    write_speech_like_audio(root / "voice.wav", seconds=0.5).rename(voice)
    return {"video": clip, "audio": voice}


class Streamed:
    """A stored file as a bucket would hand it over (no local path): streamed by the replica."""

    def __init__(self, path: Path) -> None:
        local = LocalObject(path)
        self.size, self.etag, self.last_modified = local.size, local.etag, local.last_modified
        self.local_path: Path | None = None
        self.iter_range = local.iter_range

    def redirect_url(self, filename: str, disposition: str = "attachment", media_type=None) -> str | None:
        return None


class CountingManager(FakeManager):
    """Counts the jobs-list reads (what the script is after); ``streamed``: files as bucket objects."""

    def __init__(self, root: Path, streamed: bool = False) -> None:
        super().__init__(root)
        self.streamed = streamed
        self.list_calls = 0

    def list(self, owner=None, limit=100):
        self.list_calls += 1
        return super().list(owner, limit)

    def open_file(self, job_id, name, owner=None):
        opened = super().open_file(job_id, name, owner)
        return Streamed(opened.local_path) if self.streamed else opened


def _manager(tmp_path: Path, streamed: bool = False) -> CountingManager:
    (tmp_path / "jobs").mkdir()
    return CountingManager(tmp_path / "jobs", streamed)


def _app(manager: FakeManager):
    return create_rest_app(manager, Health(), ApiLimits(max_video_bytes=5 << 20, max_audio_bytes=2 << 20))


def _submit(client: httpx.Client, hostile: dict[str, Path]) -> str:
    """Uploads both, as a browser would send them: the type a client claims is never trusted either."""
    files = {kind: (path.name, path.read_bytes(), "application/octet-stream") for kind, path in hostile.items()}
    resp = client.post("/generate", files=files)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def _assert_guarded(resp, media_type: str, disposition: str, name: str | None = None) -> None:
    assert resp.headers["content-type"] == media_type
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["content-security-policy"] == CSP_SANDBOX
    assert resp.headers["content-disposition"].split(";")[0] == disposition
    if name is not None:  # the user's name is shown as it was; it decides nothing
        assert f'filename="{name}"' in resp.headers["content-disposition"]


@pytest.mark.parametrize("streamed", [False, True], ids=["file", "stream"])
def test_inputs_are_served_as_their_probed_content_never_by_their_name(tmp_path, hostile, streamed) -> None:
    manager = _manager(tmp_path, streamed)
    client = TestClient(_app(manager))
    job_id = _submit(client, hostile)
    video = client.get(f"/jobs/{job_id}/inputs/video")
    assert video.status_code == 200 and video.content == hostile["video"].read_bytes()
    _assert_guarded(video, "video/mp4", "inline", "clip.html")
    audio = client.get(f"/jobs/{job_id}/inputs/audio")
    assert audio.status_code == 200 and audio.content == hostile["audio"].read_bytes()
    _assert_guarded(audio, "audio/wav", "inline", "voice.svg")
    # what a player asks for: ranges and HEAD, with the same guards
    part = client.get(f"/jobs/{job_id}/inputs/video", headers={"Range": "bytes=4-11"})
    assert part.status_code == 206 and part.content == hostile["video"].read_bytes()[4:12]
    _assert_guarded(part, "video/mp4", "inline")
    _assert_guarded(client.head(f"/jobs/{job_id}/inputs/audio"), "audio/wav", "inline")
    unsatisfiable = client.get(f"/jobs/{job_id}/inputs/video", headers={"Range": "bytes=999999-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["x-content-type-options"] == "nosniff"
    assert unsatisfiable.headers["content-security-policy"] == CSP_SANDBOX
    _assert_guarded(client.get(f"/jobs/{job_id}/thumbnail.jpg"), "image/jpeg", "inline", f"{job_id}.jpg")
    manager.finish(job_id)
    _assert_guarded(client.get(f"/download/{job_id}"), "video/mp4", "attachment", f"lip_sync_{job_id}.mp4")


def test_an_input_of_unknown_content_is_an_attachment(tmp_path, hostile) -> None:
    """A record that does not say what its probe found (older than the summary's demuxer, or a URL
    input not fetched yet) is served as bytes to save, never shown."""
    manager = _manager(tmp_path)
    client = TestClient(_app(manager))
    job_id = _submit(client, hostile)
    manager._set(job_id, media=None)
    for kind, name in (("video", "clip.html"), ("audio", "voice.svg")):
        _assert_guarded(client.get(f"/jobs/{job_id}/inputs/{kind}"), "application/octet-stream", "attachment", name)


@pytest.mark.parametrize("media_type", ["text/html", "image/svg+xml", "application/xhtml+xml", "text/plain",
                                        "application/octet-stream", "video/mp4; x=<html>"])
@pytest.mark.parametrize("streamed", [False, True], ids=["file", "stream"])
def test_only_playable_media_types_are_ever_inline(tmp_path, media_type, streamed) -> None:
    """object_response's own rule, whatever a caller asks for: a type a browser may render as a
    document goes out as an attachment, sandboxed and unsniffed."""
    path = tmp_path / "page.html"
    path.write_text(f"<html><body>{SCRIPT}</body></html>")
    stored = Streamed(path) if streamed else LocalObject(path)
    response = object_response(stored, "page.html", media_type=media_type, inline=True)
    answer = TestClient(response).get("/")  # a response is an ASGI app: serve it as is
    assert answer.headers["content-type"].startswith(media_type.split(";")[0])
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"] == CSP_SANDBOX
    assert answer.headers["content-disposition"] == 'attachment; filename="page.html"'


def test_a_redirect_to_the_bucket_carries_the_guards_too(tmp_path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(b"\x00" * 16)

    class Presigned(Streamed):
        def redirect_url(self, filename: str, disposition: str = "attachment", media_type=None) -> str | None:
            return f"http://127.0.0.1:9/bucket/x?disposition={disposition}"

    answer = object_response(Presigned(path), "clip.html", media_type="text/html", inline=True)
    assert answer.status_code == 307 and answer.headers["location"].endswith("disposition=attachment")
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["content-security-policy"] == CSP_SANDBOX


# --------------------------------------------------------------------------- in a browser


@pytest.fixture
def live(tmp_path) -> Iterator[tuple[str, CountingManager]]:
    """The REST app where the service has it (under /api/lip-sync), on a loopback port."""
    import uvicorn

    manager = _manager(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mounted = Starlette(routes=[Mount(PREFIX, app=_app(manager))])
    server = uvicorn.Server(uvicorn.Config(mounted, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", manager
    server.should_exit = True
    thread.join(10)


def test_a_browser_opening_the_html_named_upload_runs_no_script(browser, live, hostile) -> None:
    from playwright.sync_api import Error as PlaywrightError

    base, manager = live
    with httpx.Client(base_url=base + PREFIX, timeout=30) as http:
        job_id = _submit(http, hostile)
    listed_before = manager.list_calls
    inputs = f"{base}{PREFIX}/jobs/{job_id}/inputs"
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    try:
        response = page.goto(f"{inputs}/video")
        page.wait_for_timeout(1000)  # time for the script, and its fetch, had it run
        assert manager.list_calls == listed_before, f"the upload's script read the jobs list: {page.title()!r}"
        assert page.title() != RAN and not page.title().startswith("leaked")
        # a media document (a player), not the bytes parsed as HTML
        assert page.evaluate("[document.contentType, document.scripts.length]") == ["video/mp4", 0]
        assert response is not None and response.status == 200
        assert response.headers["content-security-policy"] == CSP_SANDBOX
        assert page.goto(f"{inputs}/audio") is not None
        assert page.evaluate("document.contentType") == "audio/wav"  # named .svg: not an SVG document

        manager._set(job_id, media=None)  # content unknown: the browser saves it, shows nothing
        with page.expect_download() as download, pytest.raises(PlaywrightError, match="Download is starting"):
            page.goto(f"{inputs}/video")
        assert download.value.suggested_filename == "clip.html"
        page.wait_for_timeout(500)
        assert manager.list_calls == listed_before
    finally:
        context.close()
