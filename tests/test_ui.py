"""The browser page at /ui, driven in headless Chromium (Debian's `chromium` package, through
Playwright; never a downloaded browser) against the real server with tiny models and auth on.

The test of a completed job saves screenshots under its tmp dir (and copies them to
$LIPSYNC_ARTIFACTS_DIR when that is set) for a reviewer to look at.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest

from lipsync_runner.media import probe_video

from .server import Server, running_server

API = "/api/lip-sync"
TOKEN = "ui-test-token"
MAX_AUDIO_BYTES = 200_000  # speech_short.wav (~106 KB) fits, speech_long.wav (~290 KB) gets 413
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("LIPSYNC_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    exe = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        exe, missing = None, "playwright is not installed (pip install -r requirements-dev.txt)"
    else:
        missing = "no chromium executable (apt-get install chromium, or set LIPSYNC_CHROMIUM)"
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"UI tests need a browser on CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("ui-server"), models_dir, LIP_SYNC_API_TOKENS=TOKEN,
                        LIP_SYNC_MAX_AUDIO_BYTES=str(MAX_AUDIO_BYTES)) as srv:
        yield srv


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def open_ui(page, server: Server, token: str | None = TOKEN) -> None:
    page.goto(server.url + "/ui")  # redirects to /ui/
    assert page.url.endswith("/ui/")
    expect(page.locator("#health")).to_contain_text("Ready")
    if token is not None:
        page.fill("#token", token)
        page.click("text=Use token")
        expect(page.locator("#jobs-error")).to_have_text("")
        expect(page.locator("#token-error")).to_have_text("")


def drop_file(page, zone: str, path: Path, mime: str) -> None:
    """Drag and drop a local file onto a drop zone (a DataTransfer built in the page)."""
    page.evaluate(
        """([zone, name, mime, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: mime }));
            const el = document.getElementById(zone);
            for (const type of ["dragenter", "dragover", "drop"]) {
                el.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, dataTransfer: dt }));
            }
        }""",
        [zone, path.name, mime, base64.b64encode(path.read_bytes()).decode()],
    )


def save_artifact(path: Path) -> None:
    print(f"\nscreenshot: {path}")
    target = os.environ.get("LIPSYNC_ARTIFACTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)


def api_client(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)


# ------------------------------------------------------------------ token


def test_token_is_asked_for_checked_and_kept_for_the_tab(page, server):
    open_ui(page, server, token=None)
    # auth is on: the job list answers 401 and the page says so by the token field
    expect(page.locator("#token-error")).to_contain_text("Missing or invalid API token")
    assert page.evaluate("document.activeElement.id") == "token"

    page.fill("#token", "wrong-token")
    with page.expect_response(lambda r: r.url.endswith(f"{API}/jobs?limit=20")) as response:
        page.press("#token", "Enter")
    assert response.value.status == 401
    expect(page.locator("#token-error")).to_contain_text("Missing or invalid API token")
    expect(page.locator("#token")).to_have_attribute("aria-invalid", "true")

    page.fill("#token", TOKEN)
    with page.expect_response(lambda r: r.url.endswith(f"{API}/jobs?limit=20")) as response:
        page.click("text=Use token")
    assert response.value.status == 200
    expect(page.locator("#token-error")).to_have_text("")
    expect(page.locator("#jobs-error")).to_have_text("")
    expect(page.locator("#jobs-empty")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('lipsync.token')") == TOKEN

    page.reload()  # entered once: kept in the tab's session
    expect(page.locator("#jobs-empty")).to_be_visible()
    expect(page.locator("#token-error")).to_have_text("")
    expect(page.locator("#token")).to_have_value(TOKEN)


# ------------------------------------------------------------------ a whole job through the page


def test_generate_watch_play_download_and_clean_up(page, server, media_dir, tmp_path):
    open_ui(page, server)
    page.set_input_files("#video", media_dir / "face.mp4")
    drop_file(page, "audio-drop", media_dir / "speech_short.wav", "audio/wav")
    expect(page.locator("#audio-info")).to_contain_text("speech_short.wav")
    page.fill("#bbox_shift", "3")
    page.evaluate("""() => {  // record every status line and progress value the page shows
        window.seen = [];
        const status = document.getElementById("job-status"), bar = document.getElementById("job-progress");
        new MutationObserver(() => window.seen.push([status.textContent, bar.value]))
            .observe(status, { childList: true, characterData: true, subtree: true });
    }""")
    page.focus("#submit")
    with page.expect_response(lambda r: r.url.endswith(f"{API}/generate")) as response:
        page.keyboard.press("Enter")  # keyboard only
    assert response.value.status == 202
    job_id = response.value.json()["job_id"]
    expect(page.locator("#job-id")).to_have_text(job_id)

    expect(page.locator("#job")).to_have_attribute("data-status", "completed", timeout=120_000)
    expect(page.locator("#job-status")).to_contain_text("Completed")
    assert page.eval_on_selector("#job-progress", "p => p.value") == 1
    seen = page.evaluate("window.seen")
    texts = [text for text, _ in seen]
    print("\nstatus lines shown:", list(dict.fromkeys(texts)))
    assert texts[0].startswith("Uploading") and texts[-1].startswith("Completed"), texts
    assert any(t.startswith(("Queued", "Processing")) for t in texts), texts  # updated live while it ran
    job_progress = [value for text, value in seen if not text.startswith("Uploading")]
    assert job_progress == sorted(job_progress), seen
    page.wait_for_function(
        "() => { const v = document.getElementById('result-video'); return v.readyState >= 2 && v.videoWidth > 0; }")
    result = page.eval_on_selector("#result-video", "v => ({w: v.videoWidth, h: v.videoHeight, d: v.duration})")
    assert (result["w"], result["h"]) == (320, 240) and abs(result["d"] - 1.2) < 0.2, result
    page.wait_for_function("() => document.getElementById('input-video').readyState >= 2")
    expect(page.locator(f'#jobs li[data-job-id="{job_id}"] .badge')).to_have_text("completed")
    with api_client(server) as api:
        assert api.get(f"{API}/status/{job_id}").json()["bbox_shift"] == 3

    shot = tmp_path / "ui-completed.png"
    page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)

    with page.expect_download() as download_info:
        page.click("#download")
    download = download_info.value
    assert download.suggested_filename == f"lip_sync_{job_id}.mp4"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.read_bytes()[4:8] == b"ftyp"
    info = probe_video(saved)
    assert (info.width, info.height) == (320, 240)

    # a phone-sized screen: one column, nothing wider than the viewport
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    boxes = [page.locator(f"#{v}").bounding_box() for v in ("input-video", "result-video")]
    assert abs(boxes[0]["x"] - boxes[1]["x"]) < 1 and boxes[1]["y"] > boxes[0]["y"]  # stacked
    narrow = tmp_path / "ui-narrow.png"
    page.screenshot(path=str(narrow), full_page=True)
    save_artifact(narrow)

    # clean it up from the list, by keyboard
    page.focus(f'#jobs li[data-job-id="{job_id}"] button:has-text("Clean up")')
    page.keyboard.press("Enter")
    expect(page.locator(f'#jobs li[data-job-id="{job_id}"]')).to_have_count(0)
    expect(page.locator("#job")).to_be_hidden()
    with api_client(server) as api:
        assert api.get(f"{API}/status/{job_id}").status_code == 404


# ------------------------------------------------------------------ errors next to their fields


def server_error(server: Server, video: Path, audio: Path, **data) -> tuple[int, dict]:
    with api_client(server) as api, video.open("rb") as v, audio.open("rb") as a:
        r = api.post(f"{API}/generate", files={"video": (video.name, v), "audio": (audio.name, a)}, data=data)
    return r.status_code, r.json()


def test_api_errors_show_the_servers_message_next_to_the_field(page, server, media_dir, tmp_path):
    open_ui(page, server)
    notes = tmp_path / "notes.txt"
    notes.write_text("this is a text file, not a video\n")
    fake_mp4 = tmp_path / "holiday.mp4"
    fake_mp4.write_text("this is a text file, named like a video\n")
    short, long = media_dir / "speech_short.wav", media_dir / "speech_long.wav"
    cases = [  # video, audio, bbox_shift, the field the message belongs next to
        (notes, short, "", "video", 400),
        (fake_mp4, short, "", "video", 400),
        (media_dir / "face.mp4", long, "", "audio", 413),
        (media_dir / "face.mp4", short, "abc", "bbox_shift", 400),
    ]
    fields = ("video", "audio", "bbox_shift")
    for video, audio, shift, field, code in cases:
        status, body = server_error(server, video, audio, **({"bbox_shift": shift} if shift else {}))
        assert status == code, body
        page.set_input_files("#video", video)
        page.set_input_files("#audio", audio)
        page.fill("#bbox_shift", shift)
        page.click("#submit")
        expect(page.locator(f"#{field}-error")).to_contain_text(body["error"])
        if "message" in body:
            expect(page.locator(f"#{field}-error")).to_contain_text(body["message"])
        expect(page.locator(f"#{field}")).to_have_attribute("aria-invalid", "true")
        assert page.evaluate("document.activeElement.id") == field
        for other in fields:
            if other != field:
                expect(page.locator(f"#{other}-error")).to_have_text("")
        expect(page.locator("#top-error")).to_be_hidden()
        if video == notes:
            shot = tmp_path / "ui-error-text-file-as-video.png"
            page.screenshot(path=str(shot))
            save_artifact(shot)

    # 503 (models not loaded) goes to the top of the page; faked, since this server is ready
    page.route(f"**{API}/generate", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body='{"error": "Lip sync service not available", "details": "Models not loaded: models are loading"}'))
    page.fill("#bbox_shift", "")
    page.click("#submit")
    expect(page.locator("#top-error")).to_contain_text("Lip sync service not available: Models not loaded")
    for other in fields:
        expect(page.locator(f"#{other}-error")).to_have_text("")

    # 401: a token that stopped working shows up by the token field
    page.unroute(f"**{API}/generate")
    page.evaluate("sessionStorage.setItem('lipsync.token', 'revoked')")
    page.click("#submit")
    expect(page.locator("#token-error")).to_contain_text("Missing or invalid API token")
    assert page.evaluate("document.activeElement.id") == "token"


def test_every_control_has_a_label(page, server):
    open_ui(page, server)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, button, select, textarea')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map((el) => el.id || el.outerHTML)""")
    assert unlabelled == []
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
