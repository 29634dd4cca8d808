"""The browser page at /ui and the API reference at /, driven in headless Chromium (Debian's
`chromium` package, through Playwright; never a downloaded browser) against the real server with
tiny models (MuseTalk v1.5 loaded): one with auth on, and the shared one without (`open_server`).

Screenshots are saved under each test's tmp dir (and copied to $LIPSYNC_ARTIFACTS_DIR when that is
set) for a reviewer to look at.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from lipsync_runner import __version__
from lipsync_runner.media.ffmpeg import probe_video
from lipsync_runner.params import MODEL_VERSIONS_KEY, JobParams
from lipsync_runner.serving.docs_page import BENTOML_TAG, INFRA_TAG, TITLE

from .server import Server, running_server

API = "/api/lip-sync"
TOKEN = "ui-test-token"
MAX_AUDIO_BYTES = 200_000  # speech_short.wav (~106 KB) fits, speech_long.wav (~290 KB) gets 413
@pytest.fixture(scope="module")
def server(browser, tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("ui-server"), models_dir, LIP_SYNC_API_TOKENS=TOKEN,
                        LIP_SYNC_MAX_AUDIO_BYTES=str(MAX_AUDIO_BYTES)) as srv:
        yield srv


def new_page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def page(browser, server):
    yield from new_page(browser)


@pytest.fixture
def open_page(browser, open_server):
    """A page on the server without tokens."""
    yield from new_page(browser)


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


def open_options(page) -> None:
    """Unfold the options (every parameter but the video, the audio and the stage's two)."""
    if not page.eval_on_selector("#options", "d => d.open"):
        page.click("#options > summary")
    expect(page.locator("#params")).to_be_visible()


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


def broken_images(page) -> list[str]:
    """Shown images that did not load (hidden ones are not shown, so cannot look broken)."""
    return page.evaluate("""() => [...document.images]
        .filter((img) => img.getClientRects().length > 0 && !(img.complete && img.naturalWidth > 0))
        .map((img) => img.currentSrc || img.src || img.outerHTML)""")


def params_for(version: str) -> set[str]:
    """The job parameters the page should offer when health's model_version is `version`."""
    props = JobParams.model_json_schema()["properties"]
    return {name for name, prop in props.items() if version in prop.get(MODEL_VERSIONS_KEY, [version])}


def shown_params(page, version: str = "v15") -> set[str]:
    """The parameters offered, once the page has chosen them for `version`."""
    expect(page.locator("#params")).to_have_attribute("data-model-version", version)
    return set(page.eval_on_selector_all("#params [data-param]", "els => els.map((el) => el.dataset.param)"))


def as_model(page, server: Server, version: str) -> None:
    """Make the page's health checks report another MuseTalk version (this server has v1.5 loaded)."""
    def health(route):
        response = route.fetch()
        route.fulfill(response=response, json={**response.json(), "model_version": version})

    page.route(f"{server.url}{API}/health", health)


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
    assert shown_params(page) == params_for("v15")
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

    # generous: on a shared 2-core machine a 30-frame job has taken over 2 minutes
    expect(page.locator("#job")).to_have_attribute("data-status", "completed", timeout=300_000)
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
        st = api.get(f"{API}/status/{job_id}").json()
    assert st["bbox_shift"] == 0  # not offered, not sent: the default
    # the finished job's face tracks, marked on the first frame of the video still chosen
    assert st["faces"]["tracks"], st["faces"]
    boxes = page.locator(".track-box")
    expect(boxes).to_have_count(len(st["faces"]["tracks"]))
    for track in st["faces"]["tracks"]:
        dubbed = " · dubbed" if track["id"] in st["faces"]["chosen"] else ""
        expect(page.locator(f".track-box[data-track='{track['id']}']")).to_have_text(f"Person {track['id']}{dubbed}")

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
        (media_dir / "face.mp4", short, "abc", "param-bbox_shift", 400),
    ]
    fields = ("video", "audio", "param-bbox_shift")
    for video, audio, shift, field, code in cases:
        status, body = server_error(server, video, audio, **({"bbox_shift": shift} if shift else {}))
        assert status == code, body
        if shift:  # bbox_shift is offered for MuseTalk v1.0 only
            as_model(page, server, "v1")
            page.reload()
            open_options(page)
            expect(page.locator("#param-bbox_shift")).to_be_visible()
        page.set_input_files("#video", video)
        page.set_input_files("#audio", audio)
        if shift:
            page.fill("#param-bbox_shift", shift)
        page.click("#submit")
        expect(page.locator(f"#{field}-error")).to_contain_text(body["error"])
        if "message" in body:
            expect(page.locator(f"#{field}-error")).to_contain_text(body["message"])
        expect(page.locator(f"#{field}")).to_have_attribute("aria-invalid", "true")
        assert page.evaluate("document.activeElement.id") == field
        for other in fields:
            if other != field and page.locator(f"#{other}").count():
                expect(page.locator(f"#{other}-error")).to_have_text("")
        expect(page.locator("#top-error")).to_be_hidden()
        if video == notes:
            shot = tmp_path / "ui-error-text-file-as-video.png"
            page.screenshot(path=str(shot))
            save_artifact(shot)

    # 503 (models not loaded) goes to the top of the page; faked, since this server is ready. Health is
    # faked as loading too: on a 503 the page re-checks health and clears the message once it is ready.
    page.route(f"**{API}/health", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body='{"status": "loading", "error": "models are loading", "model_version": "v1"}'))
    page.route(f"**{API}/generate", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body='{"error": "Lip sync service not available", "details": "Models not loaded: models are loading"}'))
    page.fill("#param-bbox_shift", "")
    page.click("#submit")
    expect(page.locator("#top-error")).to_contain_text("Lip sync service not available: Models not loaded")
    for other in fields:
        expect(page.locator(f"#{other}-error")).to_have_text("")
    expect(page.locator("#health")).to_contain_text("Not ready")
    # the service comes back: the next health check (every 3 s) clears the message
    page.unroute(f"**{API}/health")
    expect(page.locator("#top-error")).to_be_hidden(timeout=10_000)
    expect(page.locator("#health")).to_contain_text("Ready")

    # 401: a token that stopped working shows up by the token field
    page.unroute(f"**{API}/generate")
    page.evaluate("sessionStorage.setItem('lipsync.token', 'revoked')")
    page.click("#submit")
    expect(page.locator("#token-error")).to_contain_text("Missing or invalid API token")
    assert page.evaluate("document.activeElement.id") == "token"


def test_a_generate_by_avatar_id_sends_the_audio_without_a_video(page, server, media_dir):
    """With an avatar_id the avatar is the video: the page sends only the audio (the service then looks
    the avatar up: an unknown one is 404), and without either it asks for a video or an avatar_id."""
    open_ui(page, server)
    page.set_input_files("#audio", media_dir / "speech_short.wav")
    page.click("#submit")
    expect(page.locator("#video-error")).to_have_text("Choose a video file, or give an avatar_id.")
    page.set_input_files("#video", media_dir / "face.mp4")  # chosen, but the avatar_id wins
    open_options(page)
    page.fill("#param-avatar_id", "0b7e3f52-5c1d-4f7a-9a0e-2d6c8b4e1f93")
    page.evaluate("""() => {  // the form's field names as the page sends them (the browser hides a file body)
        const send = XMLHttpRequest.prototype.send;
        XMLHttpRequest.prototype.send = function (body) {
            window.sentFields = body instanceof FormData ? [...body.keys()] : null;
            return send.call(this, body);
        };
    }""")
    with page.expect_response(lambda r: r.url.endswith(f"{API}/generate")) as response:
        page.click("#submit")
    assert response.value.status == 404  # the service looked the avatar up: the form had no video
    assert sorted(page.evaluate("window.sentFields")) == ["audio", "avatar_id"]
    expect(page.locator("#top-error")).to_contain_text("Avatar not found")
    expect(page.locator("#video-error")).to_have_text("")
    expect(page.locator("#job")).to_be_hidden()


def unlabelled_controls(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('input, button, select, textarea')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map((el) => el.id || el.outerHTML)""")


def test_every_control_has_a_label(page, server):
    open_ui(page, server)
    assert unlabelled_controls(page) == []
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


# ------------------------------------------------------------------ only what applies


def test_the_page_offers_only_the_parameters_of_the_loaded_model(page, server):
    open_ui(page, server)
    assert shown_params(page) == params_for("v15")  # v1.5 ignores bbox_shift, so it is not offered
    expect(page.locator("#params-note")).to_contain_text("Not offered for the loaded model (v15): bbox_shift")

    as_model(page, server, "v1")
    page.reload()
    expect(page.locator("#options")).not_to_have_attribute("open", "")  # folded: video, audio and Generate first
    expect(page.locator("#param-bbox_shift")).to_be_hidden()
    open_options(page)
    expect(page.locator("#param-bbox_shift")).to_be_visible()
    assert shown_params(page, "v1") == params_for("v1")
    expect(page.locator("#params-note")).to_be_hidden()
    # rendered from the schema: its description and range (one line: behind "?", and as the tooltip),
    # the default as the placeholder
    prop = JobParams.model_json_schema()["properties"]["bbox_shift"]
    expect(page.locator("#param-bbox_shift-help")).to_be_hidden()
    page.click("#param-bbox_shift ~ details.about > summary")
    expect(page.locator("#param-bbox_shift-help")).to_be_visible()
    expect(page.locator("#param-bbox_shift-help")).to_contain_text(prop["description"])
    expect(page.locator("#param-bbox_shift")).to_have_attribute("title", re.compile(re.escape(prop["description"])))
    expect(page.locator("#param-bbox_shift-help")).to_contain_text(f"From {prop['minimum']} to {prop['maximum']}")
    expect(page.locator("#param-bbox_shift")).to_have_attribute("placeholder", str(prop["default"]))
    expect(page.locator("label[for='param-bbox_shift']")).to_contain_text("bbox_shift")


def test_without_auth_there_is_no_token_card(open_page, open_server, tmp_path):
    page = open_page
    page.goto(open_server.url + "/ui/")
    expect(page.locator("#health")).to_contain_text("Ready")
    expect(page.locator("#jobs-error")).to_have_text("")
    expect(page.locator("#access")).to_be_hidden()
    assert shown_params(page) == params_for("v15")
    assert broken_images(page) == []
    shot = tmp_path / "ui-no-auth.png"
    page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)


def test_with_auth_the_token_card_is_shown(page, server):
    page.goto(server.url + "/ui/")
    expect(page.locator("#access")).to_be_visible()
    expect(page.locator("#token-error")).to_contain_text("Missing or invalid API token")


# ------------------------------------------------------------------ a job's inputs, after a reload too


def submit_job(url: str, media_dir: Path, headers: dict | None = None) -> str:
    with httpx.Client(base_url=url, headers=headers or {}, timeout=60) as api, \
            (media_dir / "face.mp4").open("rb") as v, (media_dir / "speech_short.wav").open("rb") as a:
        r = api.post(f"{API}/generate", files={"video": ("face.mp4", v), "audio": ("speech_short.wav", a)})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def check_inputs_shown(page, base_url: str, job_id: str, tmp_path: Path, shot_name: str) -> None:
    """The list row names the inputs with their durations and has a thumbnail; the job's inputs
    play in its panel, and still do after a reload."""
    row = page.locator(f'#jobs li[data-job-id="{job_id}"]')
    expect(row.locator(".job-inputs")).to_have_text("face.mp4 · 2.0 s + speech_short.wav · 1.2 s")
    expect(row.locator("img.thumb")).to_be_visible()
    assert row.locator("img.thumb").evaluate("img => img.naturalWidth") > 0
    assert broken_images(page) == []
    row.locator("button:has-text('Show')").click()
    expect(page.locator("#job-id")).to_have_text(job_id)
    for reload in (False, True):  # as shown, then after a reload (the page resumes the job from the tab's session)
        if reload:
            page.reload()
            expect(page.locator("#job-id")).to_have_text(job_id)
        page.wait_for_function("""() => ['input-video', 'input-audio'].every((id) => {
            const m = document.getElementById(id); return !m.hidden && m.readyState >= 1; })""")
        assert page.eval_on_selector("#input-video", "v => [v.videoWidth, v.videoHeight]") == [320, 240]
        expect(page.locator("#input-note")).to_be_hidden()
    shot = tmp_path / shot_name
    page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)


def test_job_inputs_and_thumbnails_with_a_token(page, server, media_dir, tmp_path):
    # with auth on, the page fetches them with the token (a <video src> cannot send it)
    job_id = submit_job(server.url, media_dir, {"Authorization": f"Bearer {TOKEN}"})
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.headers.get("authorization", "")) if f"/jobs/{job_id}/" in r.url
            else None)
    try:
        open_ui(page, server)
        check_inputs_shown(page, server.url, job_id, tmp_path, "ui-job-inputs.png")
        assert asked and set(asked) == {f"Bearer {TOKEN}"}, asked
    finally:
        with api_client(server) as api:
            api.delete(f"{API}/cleanup/{job_id}")


def test_job_inputs_and_thumbnails_without_auth(open_page, open_server, media_dir, tmp_path):
    # without auth, the players stream from the routes themselves (seekable, nothing held in memory)
    job_id = submit_job(open_server.url, media_dir)
    try:
        open_page.goto(open_server.url + "/ui/")
        check_inputs_shown(open_page, open_server.url, job_id, tmp_path, "ui-job-inputs-no-auth.png")
        src = open_page.eval_on_selector("#input-video", "v => v.getAttribute('src')")
        assert src == f"{API}/jobs/{job_id}/inputs/video", src
    finally:
        httpx.delete(f"{open_server.url}{API}/cleanup/{job_id}", timeout=60)


# ------------------------------------------------------------------ the API reference at /


def test_the_api_reference_is_the_products(page, server, tmp_path):
    outside: list[str] = []
    console_errors: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server.url, "data:", "blob:")) else outside.append(r.url))
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.goto(server.url + "/")  # auth is on: the page and its document stay open
    expect(page).to_have_title(f"{TITLE} {__version__}")
    info = page.locator(".swagger-ui .info")
    expect(info.locator(".title")).to_contain_text(TITLE)
    expect(info.locator(".title .version").first).to_have_text(__version__)
    expect(info).not_to_contain_text("Machine Learning Service")
    expect(info).to_contain_text("Which of the two surfaces to use")
    expect(info.locator('a[href="./ui/"]')).to_be_visible()
    expect(page.locator("#ui-link")).to_have_attribute("href", "./ui/")
    tags = page.eval_on_selector_all("h3.opblock-tag[data-tag]", "els => els.map((el) => el.dataset.tag)")
    spec = httpx.get(server.url + "/docs.json", timeout=30).json()
    assert tags == [t["name"] for t in spec["tags"]] and tags[-2:] == [BENTOML_TAG, INFRA_TAG], tags  # REST first
    expect(page.locator(".opblock-summary-path[data-path='/api/lip-sync/generate']")).to_be_visible()
    expect(page.locator(".opblock-summary-description", has_text="BentoML: generate")).to_be_visible()
    page.wait_for_load_state("networkidle")
    assert broken_images(page) == []
    assert outside == [], f"the page loaded things from outside: {outside}"
    assert console_errors == [], console_errors  # a Content-Security-Policy violation shows up here
    shot = tmp_path / "api-reference.png"
    page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)

    page.click("#ui-link")
    expect(page.locator("#health")).to_contain_text("Ready")
    assert page.url == server.url + "/ui/"


# ------------------------------------------------------------------ the stage: face, segments, preview

TWO_PEOPLE_SIZE = (480, 270)
TWO_PEOPLE_FRAMES = 50  # 2 s at 25 fps


@pytest.fixture(scope="module")
def two_people_clip(tmp_path_factory):
    """The face-choice tests' clip: Grace Hopper on the left, the astronaut on the right (real photos)."""
    from lipsync_runner.media.samples import two_people, write_actors_video

    actors = two_people(TWO_PEOPLE_FRAMES, TWO_PEOPLE_SIZE)
    path = write_actors_video(tmp_path_factory.mktemp("two-people") / "two_people.mp4", actors, TWO_PEOPLE_FRAMES,
                              size=TWO_PEOPLE_SIZE)
    return path, {"hopper": actors[0], "astronaut": actors[1]}


def choose_clip(page, clip: Path, audio: Path) -> None:
    page.set_input_files("#video", clip)
    page.set_input_files("#audio", audio)
    expect(page.locator("#stage")).to_have_attribute("data-ready", "strip", timeout=30_000)  # every thumbnail drawn


def click_frame(page, x: float, y: float) -> None:
    """Click the first frame where the video's pixel (x, y) is shown."""
    page.locator("#frame").scroll_into_view_if_needed()
    box = page.locator("#frame").bounding_box()
    page.mouse.click(box["x"] + (x + 0.5) * box["width"] / TWO_PEOPLE_SIZE[0],
                     box["y"] + (y + 0.5) * box["height"] / TWO_PEOPLE_SIZE[1])


def drag_strip(page, start_s: float, end_s: float, duration_s: float = TWO_PEOPLE_FRAMES / 25) -> None:
    """Press on the strip at start_s, move to end_s, release (the mouse, as a person draws)."""
    page.locator("#strip").scroll_into_view_if_needed()
    box = page.locator("#strip").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * start_s / duration_s, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end_s / duration_s, y, steps=8)
    page.mouse.up()


def point_of(text: str) -> tuple[int, int]:
    x, y = text.split(",")
    return int(x), int(y)


def inside(point: tuple[int, int], box: tuple[int, int, int, int]) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def test_a_click_on_a_face_of_the_first_frame_sets_that_persons_point(page, server, media_dir, two_people_clip):
    clip, people = two_people_clip
    open_ui(page, server)
    choose_clip(page, clip, media_dir / "speech_short.wav")
    # the first frame, drawn from the local file at the video's own size; ten thumbnails under it
    assert page.eval_on_selector("#frame", "c => [c.width, c.height]") == list(TWO_PEOPLE_SIZE)
    thumbs = page.eval_on_selector_all("#thumbs canvas", """cs => cs.map((c) => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let sum = 0; for (let i = 0; i < d.length; i += 4) sum += d[i] + d[i + 1] + d[i + 2];
        return sum / (d.length / 4) / 3; })""")
    assert len(thumbs) == 10 and all(mean > 40 for mean in thumbs), thumbs  # frames, not black canvases

    for name in ("astronaut", "hopper"):
        person, other = people[name], people["hopper" if name == "astronaut" else "astronaut"]
        fx, fy = person.face_center(0)
        click_frame(page, fx, fy)
        sent = point_of(page.input_value("#param-face_point"))  # the folded option it fills
        assert inside(sent, person.tile(0)) and not inside(sent, other.tile(0)), (name, sent)
        assert abs(sent[0] - fx) <= 2 and abs(sent[1] - fy) <= 2, (sent, (fx, fy))
        expect(page.locator(".marker.job")).to_have_attribute("data-point", f"{sent[0]},{sent[1]}")
        expect(page.locator("#face-choice")).to_contain_text(f"{sent[0]}, {sent[1]}")

    page.click("#face-clear")
    expect(page.locator("#param-face_point")).to_have_value("")
    expect(page.locator(".marker.job")).to_have_count(0)
    open_options(page)  # typed into the option, the point shows on the frame too
    page.fill("#param-face_point", "100,120")
    expect(page.locator(".marker.job")).to_have_attribute("data-point", "100,120")

    # by keyboard: the strip is a slider (arrows move the cursor, Shift: 1 s), Enter adds a 1 s segment
    page.focus("#strip")
    page.keyboard.press("Shift+ArrowRight")
    for _ in range(2):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#strip")).to_have_attribute("aria-valuenow", "0.8")
    page.keyboard.press("Enter")
    assert json.loads(page.input_value("#param-segments")) == [{"start": 0.8, "end": 1.8}]
    page.fill("#segments li .segment-end", "1.5")  # the times can be edited
    page.locator("#segments li .segment-end").dispatch_event("change")
    assert json.loads(page.input_value("#param-segments")) == [{"start": 0.8, "end": 1.5}]
    assert unlabelled_controls(page) == []
    page.click("#segments li .segment-remove")
    expect(page.locator("#param-segments")).to_have_value("")


def test_a_segment_drawn_on_the_strip_and_the_folded_options_reach_the_job(page, server, media_dir,
                                                                           two_people_clip, tmp_path):
    """Against the real service: what the stage and the options set is what the job was given."""
    clip, people = two_people_clip
    open_ui(page, server)
    choose_clip(page, clip, media_dir / "speech_short.wav")
    drag_strip(page, 0.2, 0.8)
    expect(page.locator("#segments li")).to_have_count(1)
    drawn = json.loads(page.input_value("#param-segments"))
    assert len(drawn) == 1 and abs(drawn[0]["start"] - 0.2) < 0.03 and abs(drawn[0]["end"] - 0.8) < 0.03, drawn
    expect(page.locator("#strip-segments .strip-segment")).to_have_count(1)
    hx, hy = people["hopper"].face_center(0)
    page.keyboard.press("Escape")  # no segment selected: the click picks the job's face
    click_frame(page, hx, hy)
    point = page.input_value("#param-face_point")
    open_options(page)
    page.select_option("#param-sync_mode", "loop")
    page.select_option("#param-silence", "generate")
    shot = tmp_path / "ui-stage.png"
    page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)

    with page.expect_response(lambda r: r.url.endswith(f"{API}/generate")) as response:
        page.click("#submit")
    assert response.value.status == 202, response.value.text()
    job_id = response.value.json()["job_id"]
    try:
        with api_client(server) as api:
            params = api.get(f"{API}/status/{job_id}").json()["params"]
        assert [(s["start"], s["end"]) for s in params["segments"]] == [(s["start"], s["end"]) for s in drawn]
        assert params["face_point"] == list(map(float, point_of(point)))  # parsed by the service
        assert inside(point_of(point), people["hopper"].tile(0))
        assert (params["sync_mode"], params["silence"]) == ("loop", "generate")
    finally:
        with api_client(server) as api:
            api.delete(f"{API}/cleanup/{job_id}")


def with_segment_speakers(page, server: Server) -> None:
    """The parameter schema with a face per segment (the speakers' Segment fields), whether or not this
    service has them yet: the page offers what the schema says."""
    def params(route):
        response = route.fetch()
        schema = response.json()
        segment = schema["$defs"]["Segment"]["properties"]
        segment.setdefault("face", {"anyOf": [{"enum": ["largest", "center", "speaker"], "type": "string"},
                                              {"type": "integer", "minimum": 0}], "default": None})
        segment.setdefault("face_point", {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None})
        route.fulfill(response=response, json=schema)

    page.route(f"{server.url}{API}/params", params)


PREVIEW_FACES = {"count": 2, "frames": TWO_PEOPLE_FRAMES, "chosen": [1], "tracks": [
    {"id": 0, "first_frame": 0, "last_frame": 49, "frames": 50, "box": [45, 60, 215, 230]},
    {"id": 1, "first_frame": 0, "last_frame": 49, "frames": 50, "box": [280, 70, 420, 205]},
], "segments": [{"segment": 0, "chosen": [1]}, {"segment": 1, "chosen": [0]}]}  # who each segment dubbed


def test_preview_sends_the_stage_and_marks_who_is_who(page, server, media_dir, two_people_clip, tmp_path):
    """Preview is routed to a canned answer (a video, the face summary, the stretch): what matters here
    is the request the page makes and what it shows of the answer."""
    clip, people = two_people_clip
    sent: list[dict] = []

    def preview(route):
        sent.append(page.evaluate("window.lastForm"))
        if len(sent) == 1:  # the first one: the service is busy with other previews
            route.fulfill(status=429, headers={"Retry-After": "2"}, json={"error": "Too many previews at once"})
            return
        route.fulfill(status=200, body=clip.read_bytes(), headers={
            "Content-Type": "video/mp4", "X-Lip-Sync-Faces": json.dumps(PREVIEW_FACES, separators=(",", ":")),
            "X-Lip-Sync-Preview": "start=1.00;end=2.00"})

    with_segment_speakers(page, server)
    page.route(f"{server.url}{API}/preview", preview)
    open_ui(page, server)
    page.evaluate("""() => {  // the form's text fields and file names as the page sends them
        const fetch0 = window.fetch;
        window.fetch = (url, init) => {
            if (init && init.body instanceof FormData) {
                window.lastForm = Object.fromEntries([...init.body.entries()]
                    .map(([k, v]) => [k, typeof v === "string" ? v : `file:${v.name}`]));
            }
            return fetch0(url, init);
        };
    }""")
    choose_clip(page, clip, media_dir / "speech_short.wav")

    # segment 1: the astronaut, clicked while the segment is selected (a new segment is)
    drag_strip(page, 0.2, 0.8)
    ax, ay = people["astronaut"].face_center(0)
    click_frame(page, ax, ay)
    expect(page.locator("#segments li").nth(0).locator(".segment-speaker")).to_have_value("point")
    expect(page.locator(".marker.segment")).to_have_text("S1")
    expect(page.locator("#param-face_point")).to_have_value("")  # the job's face is untouched
    # segment 2: whoever speaks
    drag_strip(page, 1.0, 1.6)
    page.locator("#segments li").nth(1).locator(".segment-speaker").select_option("speaker")
    open_options(page)
    page.select_option("#param-sync_mode", "loop")

    with page.expect_response(lambda r: r.url.endswith(f"{API}/preview")):
        page.click("#preview")
    expect(page.locator("#preview-error")).to_have_text("No preview: Too many previews at once. Try again in 2 s.")
    expect(page.locator("#preview-box")).to_be_hidden()
    with page.expect_response(lambda r: r.url.endswith(f"{API}/preview")):
        page.click("#preview")
    expect(page.locator("#preview-error")).to_have_text("")
    assert sent[0] == sent[1]  # the same form again
    form = sent[-1]
    assert form["video"] == "file:two_people.mp4" and form["audio"] == "file:speech_short.wav"
    assert form["at"] == "1"  # the selected segment's start
    assert form["sync_mode"] == "loop"
    segments = json.loads(form["segments"])
    assert [(s["start"], s["end"]) for s in segments] == [(0.2, 0.8), (1.0, 1.6)] or all(
        abs(a - b) < 0.03 for s, want in zip(segments, [(0.2, 0.8), (1.0, 1.6)]) for a, b in
        zip((s["start"], s["end"]), want)), segments
    assert inside(point_of(segments[0]["face_point"]), people["astronaut"].tile(0)) and "face" not in segments[0]
    assert segments[1]["face"] == "speaker" and "face_point" not in segments[1]

    # the answer: the video plays, its stretch is named, and the tracks are marked who is who
    page.wait_for_function("() => document.getElementById('preview-video').readyState >= 1")
    expect(page.locator("#preview-note")).to_have_text("Preview of 1.00–2.00 s.")
    boxes = page.locator(".track-box")
    expect(boxes).to_have_count(2)
    expect(boxes.nth(0)).to_have_text("Person 0")
    expect(boxes.nth(1)).to_have_text("Person 1 · dubbed")
    frame = page.locator("#frame").bounding_box()
    right = boxes.nth(1).bounding_box()  # [280, 70, 420, 205] of 480x270, drawn where it is
    assert abs(right["x"] - (frame["x"] + 280 / 480 * frame["width"])) < 2
    assert abs(right["width"] - 140 / 480 * frame["width"]) < 2
    rows = page.locator("#segments li .segment-who")
    expect(rows).to_have_text(["preview dubbed person 1", "preview dubbed person 0"])
    # the tracks are choices too: a segment may name one
    options = page.locator("#segments li").nth(1).locator(".segment-speaker option")
    expect(options).to_contain_text(["person 0", "person 1"])

    # keyboard: with no segment selected, Enter on a track box dubs that person (its box's centre)
    page.focus("#strip")
    page.keyboard.press("Escape")
    page.focus(".track-box[data-track='0']")
    page.keyboard.press("Enter")
    expect(page.locator("#param-face_point")).to_have_value("130,145")
    shot = tmp_path / "ui-preview.png"
    page.screenshot(path=str(shot), full_page=True)
    save_artifact(shot)

    # a phone-sized screen: the frame, the preview and the strip stack, nothing wider than the viewport
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    frame, preview = page.locator("#frame").bounding_box(), page.locator("#preview-video").bounding_box()
    assert abs(frame["x"] - preview["x"]) < 1 and preview["y"] > frame["y"]
    narrow = tmp_path / "ui-preview-narrow.png"
    page.screenshot(path=str(narrow), full_page=True)
    save_artifact(narrow)


def test_a_running_job_with_progressive_output_is_handed_to_the_player_script(page, server, media_dir):
    """The hook for progressive.js: a `<video id="live-video">` and one attach() call per job."""
    job_id = submit_job(server.url, media_dir, {"Authorization": f"Bearer {TOKEN}"})

    def status(route):
        response = route.fetch()
        body = {**response.json(), "status": "processing", "stage": "generate", "progress": 0.5,
                "progressive": {"playlist": f"{API}/jobs/{job_id}/live/index.m3u8", "playable_seconds": 0.8,
                                "ended": False}}
        route.fulfill(response=response, json=body)

    try:
        page.route(f"{server.url}{API}/status/{job_id}", status)
        # the player script itself (progressive.js, tested with hls.js in test_progressive.py) stands aside
        page.route("**/ui/progressive.js", lambda route: route.fulfill(
            content_type="text/javascript", body="""window.LipSyncProgressive = { calls: [],
            attach(video, playlist, token) { this.calls.push([video.id, playlist, token]); return null; } };"""))
        open_ui(page, server)
        page.locator(f'#jobs li[data-job-id="{job_id}"] button:has-text("Show")').click()
        expect(page.locator("#live-note")).to_have_text("playable: 0.8 s")
        expect(page.locator("#live-video")).to_be_visible()
        for _ in range(3):  # three more polls, each with `progressive`: still attached once
            with page.expect_response(lambda r: r.url.endswith(f"/status/{job_id}")):
                pass
        calls = page.evaluate("window.LipSyncProgressive.calls")
        assert calls == [["live-video", f"{server.url}{API}/jobs/{job_id}/live/index.m3u8", TOKEN]], calls
    finally:
        with api_client(server) as api:
            api.delete(f"{API}/cleanup/{job_id}")


def test_the_header_links_to_the_live_page(page, server):
    open_ui(page, server)
    expect(page.locator("header nav a", has_text="Live")).to_have_attribute("href", "live.html")
