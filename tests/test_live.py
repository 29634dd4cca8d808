"""Live sessions (issue 22 item 2): speech streamed in over a WebSocket, a talking avatar streamed out.

The service core runs in process (runner and API in one process, the tiny random-weight models)
behind the real REST app and the real token middleware (jobs scoped per token), served by uvicorn
on the loopback so the SDK talks real WebSockets to it. The avatar is small (160x120, 1 s).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import httpx_ws
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from lipsync_client import LipSyncClient
from lipsync_client.errors import LiveSessionClosed
from lipsync_client.live import read_pcm
from lipsync_runner.api import create_rest_app
from lipsync_runner.api.auth import BearerAuthMiddleware
from lipsync_runner.config import (ApiLimits, AuthSettings, LiveSettings, RunnerSettings, ServiceSettings,
                                   Settings)
from lipsync_runner.media.ffmpeg import ffmpeg_exe, probe_video
from lipsync_runner.serving.core import ServiceCore
from lipsync_runner.serving.runner import RunnerCore

from .loopback_http import serve_asgi

FPS = 25
TOKEN_A, TOKEN_B = "tok-a", "tok-b"
LIVE = LiveSettings(sessions_per_client=2, max_sessions=2, idle_timeout_s=6.0, jitter_ms=200, batch_frames=5,
                    send_buffer_bytes=32 * 1024)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    root = tmp_path_factory.mktemp("live-media")
    speech = write_speech_like_audio(root / "speech.mp3", seconds=10.0)
    wav = root / "speech.wav"  # what a live client sends: 16 kHz mono s16le
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(speech), "-ar", "16000", "-ac", "1", "-sample_fmt", "s16",
                    str(wav)], check=True)
    return {"video": write_face_video(root / "face.mp4", seconds=1.0, fps=FPS, size=(320, 240)), "speech": wav}


@pytest.fixture(scope="module")
def core(tmp_path_factory, models_dir, model):
    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.model, runner.state = model, "ready"
    api = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=tmp_path_factory.mktemp("live-service"), job_workers=1,
                                free_space_floor_mb=0, chunk_frames=4),
        runner=RunnerSettings(device="cpu", models_dir=models_dir), live=LIVE,
        auth=AuthSettings(api_tokens=f"{TOKEN_A},{TOKEN_B}", scope_jobs_to_token=True)))
    api.start(None)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def server(core):
    """The REST app (its /live route included) behind the token middleware, on a loopback port."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    rest = create_rest_app(core.operations, core.health, ApiLimits(), live=lambda: core.live)
    from lipsync_runner.ui import create_ui_app

    app = BearerAuthMiddleware(Starlette(routes=[Mount("/api/lip-sync", rest), Mount("/ui", create_ui_app())]),
                               core.settings.auth)
    listener = socket.socket()
    # small kernel send buffers (accepted sockets inherit them): a client that stops reading fills them
    # at once, and the server's own bound is what is left to hold the rest
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    listener.bind(("127.0.0.1", 0))
    with serve_asgi(app, listener=listener, ws="wsproto") as url:
        yield url


@pytest.fixture(scope="module")
def avatar_id(server, media) -> str:
    with LipSyncClient(server, TOKEN_A) as c:
        avatar = c.create_avatar(media["video"])
        ready = c.wait_avatar(avatar.avatar_id, timeout=120)
        assert ready.ready, ready
        return avatar.avatar_id


def decoded(path: Path) -> tuple[int, float, float]:
    """(video frames, video seconds, audio seconds) of an MP4, by decoding it."""
    info = probe_video(path)
    frames = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v", "-fps_mode", "passthrough",
                             "-f", "rawvideo", "-pix_fmt", "gray", "-"], capture_output=True, check=True).stdout
    n = len(frames) // (info.width * info.height)
    pcm = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a", "-f", "s16le", "-ac", "1",
                          "-ar", "16000", "-"], capture_output=True, check=True).stdout
    return n, n / float(info.fps), len(pcm) / 2 / 16000


# --------------------------------------------------------------------------- the stream


def test_ten_seconds_of_speech_give_ten_seconds_of_video_in_sync(server, avatar_id, media, tmp_path):
    pcm = read_pcm(media["speech"])
    assert len(pcm) == 10 * 16000 * 2
    out = tmp_path / "live.mp4"
    with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
        ready = session.ready
        assert ready["fps"] == FPS and (ready["width"], ready["height"]) == (320, 240)
        assert ready["mime"].startswith("video/mp4") and "avc1" in ready["mime"] and "mp4a" in ready["mime"]
        session.stream(pcm, realtime=False)  # all at once: the server paces the output itself
        received = list(session)
    init = received[0]
    assert isinstance(init, bytes) and init[4:8] == b"ftyp" and b"moov" in init  # the init segment comes first
    assert all(m[4:8] == b"moof" for m in received[1:] if isinstance(m, bytes))  # then whole fragments
    out.write_bytes(b"".join(m for m in received if isinstance(m, bytes)))  # they play as one MP4 file
    end = received[-1]
    # every received sample became a speech frame: 10 s at 25 fps, exactly; nothing dropped
    assert end["type"] == "end" and end["speech_frames"] == 10 * FPS and end["dropped"] == 0, end
    assert end["frames"] == end["speech_frames"] + end["idle_frames"]
    frames, video_s, audio_s = decoded(out)
    assert frames == end["frames"]
    assert abs(audio_s - video_s) <= 1 / FPS, (audio_s, video_s)


def test_a_pause_in_the_speech_gives_idle_frames_not_a_stall(server, avatar_id, media):
    pcm = read_pcm(media["speech"])[: 16000 * 2]  # 0.5 s of speech, a 4.5 s pause, then 0.5 s
    half = len(pcm) // 2
    arrivals: list[tuple[float, object]] = []
    pause: dict[str, float] = {}
    with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
        def speak() -> None:
            session.send(pcm[:half])
            pause["start"] = time.monotonic()
            time.sleep(4.5)
            pause["end"] = time.monotonic()
            session.send(pcm[half:])
            session.end()

        sender = threading.Thread(target=speak)
        sender.start()
        for message in session:
            arrivals.append((time.monotonic(), message))
        sender.join()
    end = arrivals[-1][1]
    assert end["speech_frames"] == FPS, end  # all the speech, 1 s
    assert end["idle_frames"] >= FPS, end  # the pause was filled with the avatar's own frames
    # the stream went on while no speech came: media arrived late in the pause (the first 0.5 s of
    # speech is rendered by then even on a slow machine)
    assert any(pause["start"] + 3.0 < t < pause["end"] for t, m in arrivals if isinstance(m, bytes))


def test_silence_in_the_audio_keeps_the_source_mouth(server, avatar_id, media):
    """Audio that arrives but holds no speech (a microphone in a quiet room): the avatar's own mouth,
    as silence=keep, with the audio as received (the tracks stay in step)."""
    silence = bytes(2 * 16000)  # 1 s of digital silence
    with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
        session.send(silence)
        session.end()
        end = [m for m in session if isinstance(m, dict)][-1]
    assert end["speech_frames"] == FPS and end["silent_frames"] == FPS, end


# --------------------------------------------------------------------------- tenancy and limits


def closed(server: str, token: str | None, avatar_id: str) -> LiveSessionClosed:
    with pytest.raises(LiveSessionClosed) as refused:
        with LipSyncClient(server, token) as c, c.live(avatar_id) as session:
            for _ in session:
                pass
    return refused.value


def closed_code(server: str, token: str | None, avatar_id: str) -> int:
    return closed(server, token, avatar_id).code


def test_tenancy_and_tokens(server, avatar_id):
    assert closed_code(server, None, avatar_id) == 4401
    assert closed_code(server, "wrong", avatar_id) == 4401
    assert closed_code(server, TOKEN_B, avatar_id) == 4404  # another owner's avatar does not exist for B
    assert closed_code(server, TOKEN_A, "0" * 32) == 4404
    # a browser sends its token as a subprotocol (it cannot set headers on a WebSocket)
    url = server.replace("http", "ws") + f"/api/lip-sync/live?avatar_id={avatar_id}"
    with httpx.Client() as http, httpx_ws.connect_ws(url, http, subprotocols=["lipsync.live", f"bearer.{TOKEN_A}"],
                                                     max_message_size_bytes=2**24) as ws:
        assert ws.subprotocol == "lipsync.live"
        assert json.loads(ws.receive_text())["type"] == "ready"
        ws.send_text(json.dumps({"type": "end"}))


def test_a_session_reserves_its_frames_on_the_jobs_disk_ledger(server, avatar_id, core):
    """The session's frame store counts against the disk jobs use: without room, 4507 (a job's 507)."""
    ledger = core.executor.scratch
    floor = ledger.floor_bytes
    ledger.floor_bytes = ledger.free_bytes()  # nothing above the floor is left
    try:
        refused = closed(server, TOKEN_A, avatar_id)
    finally:
        ledger.floor_bytes = floor
    assert refused.code == 4507 and "disk space" in refused.message
    assert ledger.reserved_bytes == 0  # nothing held after the refusal
    with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:  # with room again, it opens
        assert session.ready["type"] == "ready"
        session.end()
        for _ in session:
            pass


def test_session_limits_and_idle_timeout(server, avatar_id, core):
    with LipSyncClient(server, TOKEN_A) as a1, a1.live(avatar_id), LipSyncClient(server, TOKEN_A) as a2, \
            a2.live(avatar_id):
        per_client = closed(server, TOKEN_A, avatar_id)  # two per client
        assert per_client.code == 4429 and "from this client" in per_client.message
        in_all = closed(server, TOKEN_B, avatar_id)  # two in all (before B's avatar is even looked up)
        assert in_all.code == 4429 and "as many live sessions" in in_all.message
    # a client that sends nothing for idle_timeout_s is closed with 4408
    started = time.monotonic()
    assert closed_code(server, TOKEN_A, avatar_id) == 4408
    assert time.monotonic() - started >= LIVE.idle_timeout_s
    # a message other than speech or {"type": "end"} closes with 4400
    with pytest.raises(LiveSessionClosed) as bad:
        with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
            session._ws.send_text("hello")
            for _ in session:
                pass
    assert bad.value.code == 4400


def test_a_client_that_stops_reading_gets_frames_dropped_not_unbounded_memory(server, avatar_id, media):
    """A raw WebSocket client with a tiny receive buffer that reads nothing for a while: the server drops
    frames (before the encoder: what is sent still plays, audio and video together) and reports them,
    and what waits for the client never exceeds the send buffer (plus the fragments of one batch)."""
    pcm = bytes(10 * 16000 * 2)  # 10 s of silence: frames without model calls, rendered at the pace of the clock
    host, port = server.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=host, target=f"/api/lip-sync/live?avatar_id={avatar_id}",
                                 extra_headers=[(b"authorization", f"Bearer {TOKEN_A}".encode())])))

    def events():
        while True:
            data = sock.recv(65536)
            ws.receive_data(data or None)
            yield from ws.events()
            if not data:
                return

    received = events()
    assert isinstance(next(received), AcceptConnection)
    text = next(received)
    assert isinstance(text, TextMessage) and json.loads(text.data)["type"] == "ready"
    sock.sendall(ws.send(BytesMessage(data=pcm)) + ws.send(TextMessage(data=json.dumps({"type": "end"}))))
    time.sleep(10)  # reads nothing while the session streams
    texts, closed, media_bytes = [], None, 0
    for event in received:
        if isinstance(event, TextMessage):
            texts.append(json.loads(event.data))
        elif isinstance(event, BytesMessage):
            media_bytes += len(event.data)
        elif isinstance(event, CloseConnection):
            closed = event.code
            break
    sock.close()
    assert closed == 1000
    end = texts[-1]
    assert end["type"] == "end" and end["dropped"] > 0, end
    assert sum(e["frames"] for e in texts if e["type"] == "dropped") == end["dropped"]
    assert end["frames"] + end["dropped"] == end["speech_frames"] + end["idle_frames"]
    # the stated bound: the send buffer, plus the fragments of the batch that crossed it
    assert end["send_buffer_peak"] <= LIVE.send_buffer_bytes + 64 * 1024, end
    assert media_bytes > 0


# --------------------------------------------------------------------------- clients


def test_the_cli_streams_a_file_and_saves_the_video_and_the_async_client_does_the_same(server, avatar_id, media,
                                                                                       tmp_path):
    import asyncio
    import wave

    from lipsync_client import AsyncLipSyncClient
    from lipsync_client.cli import main

    short = tmp_path / "short.wav"  # 1 s of the speech
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(read_pcm(media["speech"])[: 16000 * 2])
    out = tmp_path / "cli.mp4"
    assert main(["--server", server, "--token", TOKEN_A, "-q", "live", "--avatar", avatar_id, str(short),
                 "-o", str(out)]) == 0
    frames, video_s, audio_s = decoded(out)
    assert frames >= FPS and abs(video_s - audio_s) <= 1 / FPS  # the second of speech, and any idle frames
    assert main(["--server", server, "--token", TOKEN_B, "-q", "live", "--avatar", avatar_id, str(short),
                 "-o", str(tmp_path / "b.mp4")]) == 3  # another owner's avatar: not found (exit 3)

    async def live_async() -> dict:
        async with AsyncLipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
            assert session.ready["type"] == "ready"
            await session.stream(read_pcm(short), realtime=False)
            return await session.save(tmp_path / "async.mp4")

    end = asyncio.run(live_async())
    assert end["speech_frames"] == FPS and decoded(tmp_path / "async.mp4")[0] == end["frames"]


def test_the_web_page_plays_a_live_session_from_a_file(server, avatar_id, media, browser, tmp_path):
    """live.html in headless Chromium: the token as a WebSocket subprotocol (the page's CSP allows the
    same-origin ws: with connect-src 'self'), a file as the speech, Media Source Extensions playing it."""
    import wave

    short = tmp_path / "two.wav"
    with wave.open(str(short), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(read_pcm(media["speech"])[: 2 * 16000 * 2])
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(server + "/ui/live.html")
    page.fill("#live-token", TOKEN_A)
    page.click("#live-refresh")
    page.wait_for_function("() => document.querySelector('#live-avatar').options.length > 0")
    page.select_option("#live-avatar", avatar_id)
    page.check('input[name="live-source"][value="file"]')
    page.set_input_files("#live-file", str(short))
    page.click("#live-start")
    page.wait_for_function("() => document.querySelector('#live-status').dataset.frames !== undefined",
                           timeout=120_000)
    frames = int(page.get_attribute("#live-status", "data-frames"))
    assert frames >= 2 * FPS - 2  # the two seconds of speech, give or take the capture's last block
    buffered = page.evaluate("() => { const b = document.querySelector('#live-video').buffered;"
                             " return b.length ? b.end(b.length - 1) : 0 }")
    assert buffered >= 1.9, buffered  # the media element holds the session's video
    assert page.evaluate("() => document.querySelector('#live-video').error") is None
    assert page.is_hidden("#live-error") and not problems, problems
    page.close()


# --------------------------------------------------------------------------- the engine's audio windows


def test_windows_from_the_recent_audio_only_equal_those_of_the_whole():
    """A session encodes only its recent audio: the windows read from states that start at step k
    (first_step=k) are the windows read from the whole sequence, for every frame whose window starts
    at or after k."""
    from fractions import Fraction

    import numpy as np

    from lipsync_runner.audio.windows import frame_windows, window_starts

    rng = np.random.default_rng(0)
    steps = rng.standard_normal((500, 5, 8)).astype(np.float32)
    for fps in (Fraction(25), Fraction(30000, 1001)):
        k = 120
        frames = np.arange(0, 140)
        frames = frames[window_starts(frames, fps) - 4 >= k]  # MuseTalk's left padding: 2 x ceil(50/fps) = 4 steps
        assert len(frames) > 50
        whole = frame_windows(steps, frames, fps)
        recent = frame_windows(steps[k:], frames, fps, first_step=k)
        assert np.array_equal(whole, recent)


def test_a_session_ends_at_its_longest_with_what_it_received(server, avatar_id, media, core):
    """LIP_SYNC_LIVE_MAX_SESSION_S: then the input ends as if the client had sent end (flush, end, 1000)."""
    core.live.settings = LIVE.model_copy(update={"max_session_s": 2.0})
    try:
        with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
            session.send(read_pcm(media["speech"])[: 16000 * 2])  # 1 s, and no end
            end = [m for m in session if isinstance(m, dict)][-1]
    finally:
        core.live.settings = LIVE
    assert end["type"] == "end" and end["speech_frames"] == FPS, end
