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
import numpy as np
import pytest
import uvicorn

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

FPS = 25
TOKEN_A, TOKEN_B = "tok-a", "tok-b"
LIVE = LiveSettings(sessions_per_client=2, max_sessions=3, idle_timeout_s=3.0, jitter_ms=200, batch_frames=5,
                    send_buffer_bytes=64 * 1024)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    root = tmp_path_factory.mktemp("live-media")
    speech = write_speech_like_audio(root / "speech.mp3", seconds=10.0)
    wav = root / "speech.wav"  # what a live client sends: 16 kHz mono s16le
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(speech), "-ar", "16000", "-ac", "1", "-sample_fmt", "s16",
                    str(wav)], check=True)
    return {"video": write_face_video(root / "face.mp4", seconds=1.0, fps=FPS, size=(160, 120)), "speech": wav}


@pytest.fixture(scope="module")
def core(tmp_path_factory, models_dir, model):
    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.model, runner.state = model, "ready"
    api = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=tmp_path_factory.mktemp("live-service"), job_workers=1,
                                free_space_floor_mb=0, chunk_frames=4),
        runner=RunnerSettings(device="cpu", models_dir=models_dir), live=LIVE))
    api.start(None)
    yield api
    api.stop()


@pytest.fixture(scope="module")
def server(core):
    """The REST app (its /live route included) behind the token middleware, on a loopback port."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    rest = create_rest_app(core.operations, core.health, ApiLimits(), live=lambda: core.live)
    app = BearerAuthMiddleware(Starlette(routes=[Mount("/api/lip-sync", rest)]), AuthSettings(api_tokens=f"{TOKEN_A},{TOKEN_B}", scope_jobs_to_token=True))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, ws="wsproto", log_level="warning",
                                       lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)


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
    frames = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v", "-fps_mode", "passthrough", "-f", "rawvideo",
                             "-pix_fmt", "gray", "-"], capture_output=True, check=True).stdout
    n = len(frames) // (info.width * info.height)
    pcm = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a", "-f", "s16le", "-ac", "1",
                          "-ar", "16000", "-"], capture_output=True, check=True).stdout
    return n, n / float(info.fps), len(pcm) / 2 / 16000


# --------------------------------------------------------------------------- the stream


def test_ten_seconds_of_speech_give_ten_seconds_of_video_in_sync(server, avatar_id, media, tmp_path):
    pcm = read_pcm(media["speech"])
    assert len(pcm) == 10 * 16000 * 2
    out = Path("/tmp/live_test_out.mp4")
    with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
        ready = session.ready
        assert ready["fps"] == FPS and (ready["width"], ready["height"]) == (160, 120)
        assert ready["mime"].startswith("video/mp4") and "avc1" in ready["mime"] and "mp4a" in ready["mime"]
        session.stream(pcm, realtime=False)  # all at once: the server paces the output itself
        first = next(iter(session))
        assert isinstance(first, bytes) and first[4:8] == b"ftyp"  # the init segment comes first
        with out.open("wb") as f:
            f.write(first)
            end = session.save(f.name + ".rest")
        f_rest = Path(str(out) + ".rest").read_bytes()
        out.write_bytes(first + f_rest)
    # every received sample became a speech frame: 10 s at 25 fps, exactly; nothing dropped
    assert end["type"] == "end" and end["speech_frames"] == 10 * FPS and end["dropped"] == 0, end
    assert end["frames"] == end["speech_frames"] + end["idle_frames"]
    frames, video_s, audio_s = decoded(out)
    print(end, frames, video_s, audio_s)
    assert frames == end["frames"]
    assert abs(audio_s - video_s) <= 1 / FPS, (audio_s, video_s)


def test_a_pause_in_the_speech_gives_idle_frames_not_a_stall(server, avatar_id, media):
    pcm = read_pcm(media["speech"])[: 2 * 16000 * 2]  # 2 s of speech, a 1.5 s pause, then 1 s
    arrivals: list[tuple[float, object]] = []
    with LipSyncClient(server, TOKEN_A) as c, c.live(avatar_id) as session:
        def speak() -> None:
            session.send(pcm[: 1 * 16000 * 2])
            time.sleep(1.5)
            session.send(pcm[1 * 16000 * 2:])
            session.end()

        sender = threading.Thread(target=speak)
        sender.start()
        for message in session:
            arrivals.append((time.monotonic(), message))
        sender.join()
    end = arrivals[-1][1]
    assert end["speech_frames"] == 2 * FPS, end
    assert end["idle_frames"] >= 10, end  # the pause was filled with the avatar's own frames
    # media kept coming during the pause: no gap of a second without a fragment
    times = [t for t, m in arrivals if isinstance(m, bytes)]
    assert max(np.diff(times)) < 1.0


# --------------------------------------------------------------------------- tenancy and limits


def closed_code(server: str, token: str | None, avatar_id: str, **kwargs) -> int:
    with pytest.raises(LiveSessionClosed) as closed:
        with LipSyncClient(server, token) as c, c.live(avatar_id) as session:
            for _ in session:
                pass
    return closed.value.code


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


def test_session_limits_and_idle_timeout(server, avatar_id, core):
    with LipSyncClient(server, TOKEN_A) as a1, a1.live(avatar_id), LipSyncClient(server, TOKEN_A) as a2, \
            a2.live(avatar_id):
        assert closed_code(server, TOKEN_A, avatar_id) == 4429  # two per client
        with LipSyncClient(server, TOKEN_B) as b, pytest.raises(LiveSessionClosed) as busy:
            with b.live(avatar_id):
                pass
        assert busy.value.code in (4404, 4429)
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


def test_a_client_that_stops_reading_gets_frames_dropped_not_unbounded_memory(server, avatar_id, media, core):
    pcm = read_pcm(media["speech"])[: 6 * 16000 * 2]
    url = server.replace("http", "ws") + f"/api/lip-sync/live?avatar_id={avatar_id}"
    headers = {"Authorization": f"Bearer {TOKEN_A}"}
    # queue_size=1: httpx-ws's reader thread stops taking messages off the socket once one waits unread
    with httpx.Client(headers=headers) as http, httpx_ws.connect_ws(url, http, queue_size=1,
                                                                    max_message_size_bytes=2**24) as ws:
        assert json.loads(ws.receive_text())["type"] == "ready"
        ws.send_bytes(pcm)
        ws.send_text(json.dumps({"type": "end"}))
        time.sleep(8)  # not reading while the session renders 6 s
        messages = []
        while True:
            try:
                event = ws.receive(timeout=60)
            except httpx_ws.WebSocketDisconnect as closed:
                assert closed.code == 1000
                break
            messages.append(event.data)
    events = [json.loads(m) for m in messages if isinstance(m, str)]
    end = events[-1]
    assert end["type"] == "end" and end["dropped"] > 0, end
    assert sum(e["frames"] for e in events if e["type"] == "dropped") == end["dropped"]
    assert end["frames"] + end["dropped"] == end["speech_frames"] + end["idle_frames"]
    # the stated bound: what waited to be sent never passed the send buffer and a few frames' fragments
    assert end["send_buffer_peak"] <= LIVE.send_buffer_bytes + 256 * 1024, end
