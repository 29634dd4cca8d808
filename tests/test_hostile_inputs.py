"""Hostile and broken inputs against the real server, each with a real file or request.

One server (tiny models, 4 MB video limit, 20 s video / audio limit, 1920x1080 pixel limit)
serves every case. Each case asserts the status, that the message names the field or the
problem, that no server path or traceback leaks, that no upload directory is left behind
for a rejected request, and that `/api/lip-sync/health` still answers 200 afterwards.

The last section is about security: internal paths and tracebacks (only with debug on),
and the runner's pickle endpoints, which must not be reachable on the API port.
"""

from __future__ import annotations

import http.client
import json
import pickle
import re
import select
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from lipsync_runner.media.ffmpeg import ffmpeg_exe
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

from .hostile_media import ffconcat, hls_playlist, mkv_with_huge_metadata, mp4_with_sample_durations
from .server import ROOT, Server, running_server

API = "/api/lip-sync"
MiB = 2**20
VIDEO_LIMIT = 4 * MiB
BOUNDARY = "hostile-boundary-7f3a"


# ------------------------------------------------------------------ server and media


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("hostile"), models_dir, LIP_SYNC_MAX_VIDEO_BYTES=str(VIDEO_LIMIT),
                        LIP_SYNC_MAX_VIDEO_SECONDS="20", LIP_SYNC_MAX_AUDIO_SECONDS="20",
                        LIP_SYNC_MAX_VIDEO_PIXELS=str(1920 * 1080), LIP_SYNC_MAX_JOB_SCRATCH_GB="0.05",
                        LIP_SYNC_JOB_WORKERS="1") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    """Every input, good and bad, as bytes (all small: the 8K frame is ~100 KB, 30 s of 64x64 ~2 KB)."""
    d = tmp_path_factory.mktemp("hostile-media")
    write_face_video(d / "face.mp4", seconds=1.0, size=(160, 120))
    write_speech_like_audio(d / "speech.wav", seconds=1.0, sample_rate=16000)
    _ffmpeg("-i", str(d / "speech.wav"), "-c:a", "aac", str(d / "audio_only.mp4"))  # an MP4 without video
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64:r=25", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", "-f", "ipod", str(d / "video_only.m4a"))  # an M4A without sound
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64", "-frames:v", "1", str(d / "still.png"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=red:s=64x64", "-frames:v", "1", str(d / "still.jpg"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=7680x4320:r=1", "-frames:v", "1", "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(d / "8k.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=64x64:r=1", "-t", "30", "-c:v", "libx264", "-preset", "ultrafast",
            "-pix_fmt", "yuv420p", str(d / "long.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=220:sample_rate=16000:duration=30", "-c:a", "aac", "-b:a", "16k",
            str(d / "long.m4a"))
    # Files that lie about themselves (tests/hostile_media.py edits the bytes)
    ffconcat(d / "playlist.wav", Path("input_video.mp4"), repeat=2000)  # the job's own video, 2000 times
    ffconcat(d / "playlist.mp4", Path("input_audio.wav"), repeat=2000)
    hls_playlist(d / "hls.mp3", Path("input_video.mp4"), repeat=2000)
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:r=1000:d=0.2", "-c:v", "libx264", "-preset", "ultrafast",
            str(d / "1000fps.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=32x32:r=25:d=128", "-vf",
            "setpts='if(lt(N,3000),N/3000,1+(N-3000)/25)/TB'", "-frames:v", "3200", "-fps_mode", "passthrough",
            "-c:v", "libx264", "-preset", "ultrafast", "-video_track_timescale", "30000", str(d / "burst.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=f=300:r=8000:d=60", "-c:a", "aac", "-b:a", "12k", "-use_editlist", "0",
            str(d / "speech60.m4a"))
    mp4_with_sample_durations(d / "speech60.m4a", d / "understated.m4a", delta=16)  # declares 0.94 s of 60
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=1920x1080:r=10", "-t", "1", "-c:v", "libx264", "-preset",
            "ultrafast", "-pix_fmt", "yuv420p", str(d / "1080p.mp4"))
    write_speech_like_audio(d / "speech19.wav", seconds=19.0, sample_rate=16000)
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=s=64x64:r=25:d=1", "-c:v", "libx264", "-preset", "ultrafast",
            str(d / "small.mkv"))
    mkv_with_huge_metadata(d / "small.mkv", d / "metadata.mkv", lines=1_000_000)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    files["empty"] = b""
    files["text"] = b"hello, this is not a video at all\n" * 40
    files["truncated.mp4"] = files["face.mp4"][: len(files["face.mp4"]) // 2]
    return files


# ------------------------------------------------------------------ helpers


def message_of(r: httpx.Response) -> str:
    """Everything the error body says, as one string ({"error"...}, BentoML's [{"error"...}] or its
    validation {"error", "detail": [{"loc", "msg"}]})."""
    try:
        body = r.json()
    except ValueError:
        return r.text
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return json.dumps(body)
    parts = [str(body.get(k, "")) for k in ("error", "message", "details")]
    for d in body.get("detail") or []:
        if isinstance(d, dict):
            parts.append(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', '')}")
    return " | ".join(p for p in parts if p)


def assert_no_leak(text: str, server: Server) -> None:
    for secret in (str(server.data_dir), str(server.data_dir.parent), str(ROOT), "/tmp/", "Traceback",
                   'File "', "site-packages"):
        assert secret not in text, f"{secret!r} leaked in {text[:400]!r}"


def assert_clear_error(r: httpx.Response, server: Server, status: int | tuple[int, ...], *words: str) -> str:
    """The status, a message naming each of `words` (case-insensitive; "a|b" = either), no leak."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:500]}"
    msg = message_of(r)
    assert msg.strip(), f"empty error message: {r.text!r}"
    for word in words:
        assert any(w.lower() in msg.lower() for w in word.split("|")), f"{word!r} not in {msg!r}"
    assert_no_leak(r.text + json.dumps(dict(r.headers)), server)
    return msg


def job_dirs(server: Server) -> set[str]:
    jobs = server.data_dir / "jobs"
    return {p.name for p in jobs.iterdir()} if jobs.is_dir() else set()


@pytest.fixture(autouse=True)
def still_healthy_and_clean(request, server: Server):
    """Around each case: no job directory is left behind unless the case accepted a job, and the
    server answers health 200 afterwards."""
    before = job_dirs(server)
    accepted: list[str] = []
    request.node.accepted_jobs = accepted
    yield
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for job_id in accepted:  # cancel and remove what a case had to accept
            c.delete(f"{API}/cleanup/{job_id}")
        deadline = time.monotonic() + 10
        while (left := job_dirs(server) - before) and time.monotonic() < deadline:
            time.sleep(0.1)  # cleanup of a just-cancelled job finishes when its worker lets go
        assert not left, f"job directories left behind: {left}"
        r = c.get(f"{API}/health")
        assert r.status_code == 200 and r.json()["status"] == "ready", r.text
        assert c.get("/livez").status_code == 200


def multipart(*parts: tuple[bytes | str, bytes | str | None, bytes], boundary: str = BOUNDARY) -> bytes:
    """A multipart body from (field name, file name or None, data); names are sent as given, raw."""
    out = b""
    for name, filename, data in parts:
        name = name.encode() if isinstance(name, str) else name
        disp = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            filename = filename.encode() if isinstance(filename, str) else filename
            disp += b'; filename="' + filename + b'"\r\nContent-Type: application/octet-stream'
        out += b"--" + boundary.encode() + b"\r\n" + disp + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n"


MP_HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def post_files(client: httpx.Client, path: str, video: tuple[str, bytes] | None, audio: tuple[str, bytes] | None,
               **fields: str) -> httpx.Response:
    files = {}
    if video is not None:
        files["video"] = (*video, "video/mp4")
    if audio is not None:
        files["audio"] = (*audio, "audio/wav")
    return client.post(path, files=files, data=fields)


def raw_exchange(server: Server, head: bytes, body_chunks, *, shut_write: bool = False,
                 timeout: float = 20) -> tuple[bytes, int]:
    """Send a raw request on one socket, reading whatever the server answers meanwhile.

    Returns (response bytes, body bytes sent). Stops sending as soon as the server has answered
    (or closed), as a careful client would.
    """
    host, port = server.url.rsplit("//", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    received = b""
    sent = 0
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(head)
        pending = iter(body_chunks)
        chunk: bytes | None = next(pending, None)
        while chunk is not None and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1)
            if readable:
                break  # the server answered (or closed) before taking the whole body
            if writable:
                try:
                    n = sock.send(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += n
                chunk = chunk[n:] or next(pending, None)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, socket.timeout, TimeoutError):
                break
            if not data:
                break
            received += data
            head_end = received.find(b"\r\n\r\n")
            if head_end >= 0:
                m = re.search(rb"content-length:\s*(\d+)", received[:head_end], re.I)
                if m and len(received) - head_end - 4 >= int(m.group(1)):
                    break
    finally:
        sock.close()
    return received, sent


def parse_raw(response: bytes) -> tuple[int, str]:
    if not response:
        return 0, ""
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


def raw_path(server: Server, method: str, path: str) -> tuple[int, str]:
    """A request whose path is sent byte for byte (httpx would normalise '..' away)."""
    host, port = server.url.rsplit("//", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    finally:
        conn.close()


# ------------------------------------------------------------------ broken media (REST)

MEDIA_CASES = [
    # id, video (name, media key), audio (name, media key), status, words the message must contain
    ("zero-byte video", ("clip.mp4", "empty"), ("speech.wav", "speech.wav"), 400, ("video", "empty")),
    ("zero-byte audio", ("clip.mp4", "face.mp4"), ("speech.wav", "empty"), 400, ("audio", "empty")),
    ("text renamed .mp4", ("clip.mp4", "text"), ("speech.wav", "speech.wav"), 400, ("clip.mp4", "not a")),
    ("truncated mp4", ("clip.mp4", "truncated.mp4"), ("speech.wav", "speech.wav"), 400,
     ("clip.mp4", "truncated|corrupt|could not be decoded")),
    ("mp4 without a video stream", ("clip.mp4", "audio_only.mp4"), ("speech.wav", "speech.wav"), 400,
     ("clip.mp4", "no video stream")),
    ("audio without an audio stream", ("clip.mp4", "face.mp4"), ("speech.m4a", "video_only.m4a"), 400,
     ("speech.m4a", "no audio stream")),
    ("video file as audio", ("clip.mp4", "face.mp4"), ("speech.wav", "face.mp4"), 400, ("speech.wav", "audio")),
    ("png renamed .mp4", ("clip.mp4", "still.png"), ("speech.wav", "speech.wav"), 400, ("clip.mp4", "still image")),
    ("jpeg renamed .mp4", ("clip.mp4", "still.jpg"), ("speech.wav", "speech.wav"), 400, ("clip.mp4", "still image")),
    ("8K frame", ("clip.mp4", "8k.mp4"), ("speech.wav", "speech.wav"), 413, ("7680x4320", "limit")),
    ("30 s video over a 20 s limit", ("clip.mp4", "long.mp4"), ("speech.wav", "speech.wav"), 413,
     ("video", "30", "limit")),
    ("30 s audio over a 20 s limit", ("clip.mp4", "face.mp4"), ("speech.m4a", "long.m4a"), 413,
     ("audio", "30", "limit")),
    # issue 11: files that lie about themselves
    ("ffconcat playlist named speech.wav", ("clip.mp4", "face.mp4"), ("speech.wav", "playlist.wav"), 400,
     ("speech.wav", "not a supported audio file", "'concat'")),
    ("ffconcat playlist named clip.mp4", ("clip.mp4", "playlist.mp4"), ("speech.wav", "speech.wav"), 400,
     ("clip.mp4", "not a supported video file", "'concat'")),
    ("HLS playlist named speech.mp3", ("clip.mp4", "face.mp4"), ("speech.mp3", "hls.mp3"), 400,
     ("speech.mp3", "not a readable audio file")),
    ("1000 fps video", ("clip.mp4", "1000fps.mp4"), ("speech.wav", "speech.wav"), 413,
     ("clip.mp4", "1000 fps", "limit of 120 fps")),
    ("3200 frames in 9 s (a variable-rate burst)", ("clip.mp4", "burst.mp4"), ("speech.wav", "speech.wav"), 413,
     ("clip.mp4", "3,200 frames", "limit of 2,400")),
    ("a million metadata lines in 1 MB", ("clip.mkv", "metadata.mkv"), ("speech.wav", "speech.wav"), 400,
     ("clip.mkv", "header is too large")),
    ("1080p, 1 s, with 19 s of speech: 68 MB of ping-pong frames over a 50 MB cap", ("clip.mp4", "1080p.mp4"),
     ("speech.wav", "speech19.wav"), 413, ("scratch disk", "ping-pong", "per-job limit of 50 MB")),
]


@pytest.mark.parametrize("video, audio, status, words", [c[1:] for c in MEDIA_CASES],
                         ids=[c[0] for c in MEDIA_CASES])
def test_broken_media_is_refused_by_content_on_the_rest_api(client, server, media, video, audio, status, words):
    r = post_files(client, f"{API}/generate", (video[0], media[video[1]]), (audio[0], media[audio[1]]))
    assert_clear_error(r, server, status, *words)


BENTO_MEDIA_CASES = [
    ("zero-byte video", ("clip.mp4", "empty"), ("speech.wav", "speech.wav"), 400, ("video", "empty")),
    ("text renamed .mp4", ("clip.mp4", "text"), ("speech.wav", "speech.wav"), 400, ("video",)),
    ("png renamed .mp4", ("clip.mp4", "still.png"), ("speech.wav", "speech.wav"), 400, ("still image",)),
    ("audio without an audio stream", ("clip.mp4", "face.mp4"), ("speech.m4a", "video_only.m4a"), 400,
     ("no audio stream",)),
    ("8K frame", ("clip.mp4", "8k.mp4"), ("speech.wav", "speech.wav"), 413, ("7680x4320", "limit")),
    ("30 s video over a 20 s limit", ("clip.mp4", "long.mp4"), ("speech.wav", "speech.wav"), 413,
     ("video", "limit")),
    ("text named .txt", ("clip.txt", "text"), ("speech.wav", "speech.wav"), 400, ("clip.txt", "not a")),
    ("ffconcat playlist named speech.wav", ("clip.mp4", "face.mp4"), ("speech.wav", "playlist.wav"), 400,
     ("'concat'",)),
    ("1080p, 1 s, with 19 s of speech over the scratch cap", ("clip.mp4", "1080p.mp4"),
     ("speech.wav", "speech19.wav"), 413, ("scratch disk", "per-job limit")),
]


@pytest.mark.parametrize("video, audio, status, words", [c[1:] for c in BENTO_MEDIA_CASES],
                         ids=[c[0] for c in BENTO_MEDIA_CASES])
def test_broken_media_is_refused_on_the_bentoml_endpoint(client, server, media, video, audio, status, words):
    r = post_files(client, "/generate", (video[0], media[video[1]]), (audio[0], media[audio[1]]))
    assert_clear_error(r, server, status, *words)


def test_audio_that_decodes_past_the_limit_fails_its_job_with_the_413_message(request, client, server, media):
    """It declares 0.94 s (its packet durations are edited), so it is admitted; decoding counts
    the real samples and stops at the 20 s limit: the job fails with that message, and the
    server goes on serving."""
    r = post_files(client, f"{API}/generate", ("clip.mp4", media["face.mp4"]),
                   ("speech.m4a", media["understated.m4a"]))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    request.node.accepted_jobs.append(job_id)
    deadline = time.monotonic() + 90
    while (job := client.get(f"{API}/status/{job_id}").json())["status"] in ("queued", "processing"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "failed", job
    assert "its audio decodes to more than the limit of 20 s" in job["error"], job
    assert_no_leak(json.dumps(job), server)


def test_bentoml_error_bodies_match_the_rest_ones(client, server, media):
    r = post_files(client, "/generate", ("clip.mp4", media["text"]), ("speech.wav", media["speech.wav"]))
    assert r.status_code == 400
    body = r.json()
    assert isinstance(body, dict) and "clip.mp4" in body["error"], body


# ------------------------------------------------------------------ the multipart form


def _form_cases(m: dict[str, bytes]) -> dict[str, tuple[dict, int, tuple[str, ...]]]:
    v, a = m["face.mp4"], m["speech.wav"]
    ok = [("video", "clip.mp4", v), ("audio", "speech.wav", a)]
    return {
        # name: (request kwargs, status, words)
        "wrong file field name": (dict(content=multipart(("file", "clip.mp4", v), ("audio", "speech.wav", a))),
                                  400, ("'file'", "video")),
        "wrong name for both": (dict(content=multipart(("vid", "clip.mp4", v), ("aud", "speech.wav", a))),
                                400, ("'vid'",)),
        "audio missing": (dict(content=multipart(("video", "clip.mp4", v))), 400, ("missing", "audio")),
        "video missing": (dict(content=multipart(("audio", "speech.wav", a))), 400, ("missing", "video")),
        "no parts at all": (dict(content=f"--{BOUNDARY}--\r\n".encode()), 400, ("missing", "video")),
        "video sent as a text field": (dict(content=multipart(("video", None, b"clip.mp4"),
                                                              ("audio", "speech.wav", a))), 400, ("video",)),
        "video sent twice": (dict(content=multipart(*ok, ("video", "again.mp4", v))), 400, ("video", "more than once")),
        "an extra file field": (dict(content=multipart(*ok, ("image", "x.png", m["still.png"]))), 400,
                                ("'image'", "expected")),
        "NUL in a field name": (dict(content=multipart(("vid\x00eo", "clip.mp4", v), ("audio", "speech.wav", a))),
                                400, ("video|field",)),
        "bbox_shift not a number": (dict(content=multipart(*ok, ("bbox_shift", None, b"up")), ), 400,
                                    ("bbox_shift", "integer")),
        "bbox_shift a float": (dict(content=multipart(*ok, ("bbox_shift", None, b"1.5"))), 400, ("bbox_shift",)),
        "bbox_shift NaN": (dict(content=multipart(*ok, ("bbox_shift", None, b"NaN"))), 400, ("bbox_shift",)),
        "bbox_shift above range": (dict(content=multipart(*ok, ("bbox_shift", None, b"101"))), 400,
                                   ("bbox_shift", "100")),
        "bbox_shift below range": (dict(content=multipart(*ok, ("bbox_shift", None, b"-101"))), 400,
                                   ("bbox_shift", "-100")),
        "bbox_shift huge": (dict(content=multipart(*ok, ("bbox_shift", None, b"9" * 400))), 400, ("bbox_shift",)),
        "bbox_shift binary": (dict(content=multipart(*ok, ("bbox_shift", None, b"\xff\xfe\x00"))), 400,
                              ("bbox_shift",)),
        "wait not a boolean": (dict(content=multipart(*ok, ("wait", None, b"maybe"))), 400, ("wait",)),
        "malformed body": (dict(content=b"this is not multipart at all" * 20), 400, ("multipart",)),
        "body ends before the closing boundary": (dict(content=multipart(*ok)[:-40]), 400,
                                                  ("multipart", "closing boundary|incomplete")),
        "CR LF inside a file name": (dict(content=multipart(("video", "clip\r\nX-Evil: 1\r\n.mp4", v),
                                                            ("audio", "speech.wav", a))), 400, ("multipart",)),
        "json instead of a form": (dict(json={"video": "clip.mp4", "audio": "speech.wav"}), 400, ("multipart",)),
        "urlencoded instead of a form": (dict(data={"video": "clip.mp4", "audio": "speech.wav"}), 400,
                                         ("multipart",)),
        "multipart without a boundary": (dict(content=multipart(*ok), headers={"content-type": "multipart/form-data"}),
                                         400, ("multipart",)),
        "empty body": (dict(content=b"", headers={"content-type": ""}), 400, ("multipart",)),
    }


FORM_CASES = list(_form_cases({k: b"x" for k in ("face.mp4", "speech.wav", "still.png")}))


@pytest.mark.parametrize("case", FORM_CASES)
def test_broken_forms_and_options_are_refused_on_the_rest_api(client, server, media, case):
    kwargs, status, words = _form_cases(media)[case]
    if "content" in kwargs:
        kwargs = {"headers": MP_HEADERS, **kwargs}
    r = client.post(f"{API}/generate", **kwargs)
    assert_clear_error(r, server, status, *words)


BENTO_FORM_CASES = {
    "audio missing": (lambda m: dict(files={"video": ("clip.mp4", m["face.mp4"])}), 400, ("audio",)),
    "no fields": (lambda m: dict(json={}), 400, ("video", "audio")),
    "bbox_shift not a number": (lambda m: dict(files={"video": ("clip.mp4", m["face.mp4"]),
                                                      "audio": ("speech.wav", m["speech.wav"])},
                                               data={"bbox_shift": "up"}), 400, ("bbox_shift",)),
    "bbox_shift out of range": (lambda m: dict(files={"video": ("clip.mp4", m["face.mp4"]),
                                                      "audio": ("speech.wav", m["speech.wav"])},
                                               data={"bbox_shift": "1000"}), 400, ("bbox_shift", "100")),
}


@pytest.mark.parametrize("case", list(BENTO_FORM_CASES))
def test_broken_forms_are_refused_on_the_bentoml_endpoint(client, server, media, case):
    build, status, words = BENTO_FORM_CASES[case]
    r = client.post("/generate", **build(media))
    assert_clear_error(r, server, status, *words)


BENTOML_MULTIPART_500 = (
    "BentoML's own multipart parsing (_bentoml_impl/serde.py MultipartSerde.parse_request, reached from "
    "service.py LipSync.generate) answers 500 instead of 400: an unexpected binary file field is json.loads()-ed "
    "(UnicodeDecodeError), and starlette's HTTPException(400) for a malformed body is caught as an unexpected error")


@pytest.mark.parametrize("case", ["wrong file field name", "malformed body"])
def test_broken_forms_on_the_bentoml_endpoint_are_400_not_500(client, server, media, case):
    kwargs, _, _ = _form_cases(media)[case]
    r = client.post("/generate", headers=MP_HEADERS, **kwargs)
    assert_no_leak(r.text, server)
    assert r.status_code == 400, f"{r.status_code}: {r.text}"


# ------------------------------------------------------------------ file names


def _evil_names(tag: str) -> dict[str, bytes]:
    return {
        "dot-dot slash": f"../../../../../tmp/evil-{tag}.mp4".encode(),
        "dot-dot backslash": f"..\\..\\..\\evil-{tag}.mp4".encode(),
        "absolute path": f"/tmp/evil-{tag}.mp4".encode(),
        "NUL inside": f"evil-{tag}\x00.mp4".encode(),
        "unicode and RTL override": f"видео 🎬 \u202eevil-{tag}\u202c.mp4".encode(),
        "latin-1 bytes": f"na\xefve-{tag}.mp4".encode("latin-1"),
        "5000 characters": (f"evil-{tag}" + "x" * 5000 + ".mp4").encode(),
        "control characters": f"evil-{tag}\t\x1b[31m\x07\x7f.mp4".encode(),
    }


@pytest.mark.parametrize("kind", list(_evil_names("x")))
def test_hostile_file_names_never_become_paths(request, client, server, media, kind):
    tag = uuid.uuid4().hex[:8]
    name = _evil_names(tag)[kind]
    body = multipart(("video", name, media["face.mp4"]), ("audio", b"../speech.wav", media["speech.wav"]))
    r = client.post(f"{API}/generate", content=body, headers=MP_HEADERS)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    request.node.accepted_jobs.append(job_id)
    assert_no_leak(r.text, server)
    # stored under fixed names in its own directory; nothing named after the upload anywhere
    files = {p.name for p in (server.data_dir / "jobs" / job_id).iterdir()}
    assert {"input_video.mp4", "input_audio.wav"} <= files and not any(tag in f for f in files), files
    for where in (server.data_dir, server.data_dir / "jobs", server.data_dir.parent, Path("/tmp")):
        assert not [p for p in where.iterdir() if tag in p.name], where
    status = client.get(f"{API}/status/{job_id}")
    assert status.status_code == 200
    shown = status.json()["inputs"]["video_filename"]  # the user's own name, as a display string only
    assert "/" not in shown and "\\" not in shown and "tmp" not in shown.split("evil")[0] and len(shown) <= 200
    assert not any(ord(ch) < 32 or 0x202a <= ord(ch) <= 0x202e for ch in shown), repr(shown)


def test_a_nul_in_a_file_name_is_only_a_name(request, client, server, media):
    """Inputs are judged by content: a NUL that hides another extension changes nothing but the shown name."""
    body = multipart(("video", b"clip.mp4\x00.exe", media["face.mp4"]), ("audio", "speech.wav", media["speech.wav"]))
    r = client.post(f"{API}/generate", content=body, headers=MP_HEADERS)
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    request.node.accepted_jobs.append(job_id)
    assert {"input_video", "input_audio.wav"} <= {p.name for p in (server.data_dir / "jobs" / job_id).iterdir()}
    shown = client.get(f"{API}/status/{job_id}").json()["inputs"]["video_filename"]
    assert "\x00" not in shown and shown == "clip.mp4.exe"
    bad = multipart(("video", b"clip.mp4\x00.exe", media["text"]), ("audio", "speech.wav", media["speech.wav"]))
    assert_clear_error(client.post(f"{API}/generate", content=bad, headers=MP_HEADERS), server, 400, "not a")


def test_file_names_on_the_bentoml_endpoint_never_become_paths(request, client, server, media):
    tag = uuid.uuid4().hex[:8]
    r = post_files(client, "/generate", (f"../../../../tmp/evil-{tag}.mp4", media["face.mp4"]),
                   (f"..\\evil-{tag}.wav", media["speech.wav"]))
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    request.node.accepted_jobs.append(job_id)
    files = {p.name for p in (server.data_dir / "jobs" / job_id).iterdir()}
    assert {"input_video.mp4", "input_audio.wav"} <= files, files
    assert not [p for p in Path("/tmp").iterdir() if tag in p.name]


# ------------------------------------------------------------------ job ids

REAL_LOOKING = "3472b1b0-aeac-4b04-8802-90e3bc0a0236"
HOSTILE_IDS = [
    "..", "...", "../jobs.sqlite3", "..%2F..%2Fjobs.sqlite3", "%2e%2e%2f%2e%2e%2fjobs.sqlite3", "..%5Cjobs.sqlite3",
    "%2E%2E", "%00", f"{REAL_LOOKING}%00", f"{REAL_LOOKING}%2F..%2F..%2Fjobs.sqlite3", f"{REAL_LOOKING}/../..",
    REAL_LOOKING.upper(), "jobs.sqlite3", "jobs.lock", "~root", "%ff%fe", "%F0%9F%8E%AC", "x" * 3000,
    f"%20{REAL_LOOKING}", "$(touch%20pwned)", "*",
]


@pytest.mark.parametrize("job_id", HOSTILE_IDS, ids=lambda s: s[:40])
def test_hostile_job_ids_are_404_on_every_rest_route(server, job_id):
    db = server.data_dir / "jobs.sqlite3"
    before = db.stat().st_size
    for method, route in (("GET", "status"), ("GET", "download"), ("POST", "cancel"), ("DELETE", "cleanup")):
        status, body = raw_path(server, method, f"{API}/{route}/{job_id}")
        assert status == 404, f"{method} {route}/{job_id}: {status} {body[:200]}"
        assert_no_leak(body, server)
    assert db.is_file() and db.stat().st_size >= before and (server.data_dir / "jobs").is_dir()


@pytest.mark.parametrize("job_id", ["../../jobs.sqlite3", "..", "/etc/passwd", "\x00", f"{REAL_LOOKING}/..",
                                    "a" * 10000, "jobs.lock"], ids=lambda s: repr(s)[:30])
def test_hostile_job_ids_are_404_on_the_bentoml_endpoints(client, server, job_id):
    for route in ("status", "download", "cancel", "cleanup"):
        r = client.post(f"/{route}", json={"job_id": job_id})
        assert_clear_error(r, server, 404, "job")
    assert (server.data_dir / "jobs.sqlite3").is_file()


@pytest.mark.parametrize("job_id", [5, None, ["x"], {"job_id": "x"}], ids=repr)
def test_job_ids_of_the_wrong_type_are_400_on_the_bentoml_endpoints(client, server, job_id):
    r = client.post("/status", json={"job_id": job_id})
    assert_clear_error(r, server, 400, "job_id")


@pytest.mark.parametrize("limit", ["abc", "0", "-1", "1001", "1e3", "9" * 40, ""])
def test_bad_list_limits_are_400(client, server, limit):
    r = client.get(f"{API}/jobs", params={"limit": limit})
    assert_clear_error(r, server, 400, "limit")


# ------------------------------------------------------------------ lying Content-Length


def _raw_head(server: Server, path: str, declared: str | int, extra: str = "") -> bytes:
    host = server.url.rsplit("//", 1)[1]
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {declared}\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("path", [f"{API}/generate", "/generate"])
def test_content_length_larger_than_the_body_then_close(server, media, path):
    body = multipart(("video", "clip.mp4", media["face.mp4"]), ("audio", "speech.wav", media["speech.wav"]))
    response, _ = raw_exchange(server, _raw_head(server, path, len(body) + 10), [body[:-10]], shut_write=True)
    status, text = parse_raw(response)
    assert status == 0 or 400 <= status < 500, response[:300]  # a clean close, or a 4xx
    assert_no_leak(text, server)


@pytest.mark.parametrize("path", [f"{API}/generate", "/generate"])
def test_content_length_smaller_than_the_body(server, media, path):
    body = multipart(("video", "clip.mp4", media["face.mp4"]), ("audio", "speech.wav", media["speech.wav"]))
    response, _ = raw_exchange(server, _raw_head(server, path, len(body) - 100), [body], timeout=15)
    status, text = parse_raw(response)
    assert status == 400, response[:300]  # the body is cut before its closing boundary / before the audio part
    assert "multipart" in text.lower() or "audio" in text.lower(), text
    assert_no_leak(text, server)


@pytest.mark.parametrize("declared", ["abc", "-5", "1, 2"])
def test_invalid_content_length_is_refused(server, media, declared):
    response, _ = raw_exchange(server, _raw_head(server, f"{API}/generate", declared), [b"x" * 100])
    status, text = parse_raw(response)
    assert status in (0, 400, 413), response[:300]
    assert_no_leak(text, server)


@pytest.mark.parametrize("path", [f"{API}/generate", "/generate"])
def test_a_huge_declared_length_is_413_before_any_body(server, path):
    t0 = time.monotonic()
    response, sent = raw_exchange(server, _raw_head(server, path, 10**12), [])
    status, text = parse_raw(response)
    assert status == 413 and "too large" in text.lower(), response[:300]
    assert time.monotonic() - t0 < 10
    assert_no_leak(text, server)


# ------------------------------------------------------------------ uploads over the size limit


class DirWatcher:
    """Samples the largest file under a directory while an upload streams in."""

    def __init__(self, root: Path) -> None:
        self.root, self.largest, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in list(self.root.rglob("*")):
                try:
                    if p.is_file():
                        self.largest = max(self.largest, p.stat().st_size)
                except OSError:
                    pass
            time.sleep(0.005)

    def __enter__(self) -> DirWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _oversized_body(audio: bytes, total: int, chunk: int = 256 * 1024):
    yield (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"speech.wav\"\r\n\r\n"
           ).encode() + audio + b"\r\n"
    yield f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"video\"; filename=\"big.mp4\"\r\n\r\n".encode()
    block = bytes(range(256)) * (chunk // 256)
    for _ in range(total // chunk):
        yield block
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_a_50_mb_streamed_video_is_413_without_being_written(client, server, media):
    total = 50 * MiB
    with DirWatcher(server.data_dir / "jobs") as watch:
        t0 = time.monotonic()
        r = client.post(f"{API}/generate", content=_oversized_body(media["speech.wav"], total), headers=MP_HEADERS)
        elapsed = time.monotonic() - t0
    msg = assert_clear_error(r, server, 413, "video", "4 MB")
    print(f"largest file while streaming: {watch.largest} bytes")
    assert watch.largest <= VIDEO_LIMIT + MiB, f"a {watch.largest} byte file was written ({msg})"
    assert elapsed < 30


@pytest.mark.parametrize("path", [f"{API}/generate", "/generate"])
def test_a_50_mb_video_with_a_declared_length_is_413_and_the_rest_is_not_read(server, media, path):
    """Both surfaces stream: BentoML's own `/generate` would buffer the whole body first (issue 11.4)."""
    chunks = list(_oversized_body(media["speech.wav"], 50 * MiB))
    declared = sum(len(c) for c in chunks)
    with DirWatcher(server.data_dir / "jobs") as watch:
        response, sent = raw_exchange(server, _raw_head(server, path, declared), chunks, timeout=60)
    status, text = parse_raw(response)
    assert status == 413 and "4 MB" in text, response[:400]
    print(f"largest file while streaming: {watch.largest} bytes, body bytes sent {sent} of {declared}")
    assert watch.largest <= VIDEO_LIMIT + MiB
    assert sent < declared, "the server read the whole 50 MB body before answering"
    assert_no_leak(text, server)


def test_an_oversized_video_on_the_bentoml_endpoint_is_413(client, server, media):
    big = media["face.mp4"] * (VIDEO_LIMIT // len(media["face.mp4"]) + 2)
    r = post_files(client, "/generate", ("big.mp4", big), ("speech.wav", media["speech.wav"]))
    assert_clear_error(r, server, 413, "video", "4 MB")


# ------------------------------------------------------------------ security


class _Unpickled:
    """A pickle that creates a marker file if anything on the API port ever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("route", ["/prepare", "/generate", "/audio_pieces", "/stats", "/api/lip-sync/prepare",
                                   "/MuseTalkRunner/prepare", "/prepare_generate", "/prepare_generate_latents"])
@pytest.mark.parametrize("content_type", ["application/vnd.bentoml+pickle", "application/vnd.bentoml.pickle"])
def test_the_runners_pickle_endpoints_are_not_reachable_on_the_api_port(server, tmp_path, route, content_type):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Unpickled(marker))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post(route, content=payload, headers={"content-type": content_type})
    # a runner route does not exist here (404); the API's own `generate` refuses pickle (415) or
    # reads the body as JSON and finds none (400)
    assert r.status_code in ((404, 405) if route != "/generate" else (400, 404, 405, 415)), r.text
    assert not marker.exists(), "the API port unpickled a request body"
    assert_no_leak(r.text, server)


def test_public_documents_and_probes_name_no_server_path(client, server, models_dir):
    for path in (f"{API}/openapi.json", "/docs.json", "/metrics", f"{API}/health", "/readyz", "/livez",
                 f"{API}/jobs", f"{API}/does-not-exist", "/does-not-exist"):
        r = client.get(path)
        assert r.status_code < 500, path
        assert_no_leak(r.text, server)
        assert str(models_dir) not in r.text, path


def test_wrong_methods_are_405_without_a_leak(client, server):
    for method, path in (("PUT", f"{API}/generate"), ("GET", f"{API}/generate"), ("PATCH", f"{API}/jobs"),
                         ("POST", f"{API}/status/{REAL_LOOKING}"), ("GET", f"{API}/cancel/{REAL_LOOKING}")):
        r = client.request(method, path)
        assert_clear_error(r, server, 405, "method")


def test_tracebacks_appear_only_with_debug_on(tmp_path):
    """An unexpected error (a 500) says only 'Internal server error', unless LIP_SYNC_DEBUG is on."""
    from starlette.testclient import TestClient

    from lipsync_runner.config import ApiLimits
    from lipsync_runner.api import create_rest_app

    secret_path = str(tmp_path / "internal" / "state.db")

    class Broken:
        def get(self, job_id, owner=None):
            raise RuntimeError(f"disk I/O error at {secret_path}")

    async def health():
        return {"status": "ready", "models_loaded": True}

    for debug in (False, True):
        app = create_rest_app(Broken(), health, ApiLimits(), debug=debug)
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get(f"/status/{uuid.uuid4()}")
        assert r.status_code == 500 and r.json()["error"] == "Internal server error"
        if debug:
            assert "Traceback" in r.json()["traceback"] and "RuntimeError" in r.text
        else:
            assert set(r.json()) == {"error"} and "Traceback" not in r.text and secret_path not in r.text


def test_after_everything_no_upload_directory_is_left_and_the_server_is_healthy(client, server):
    listed = {j["job_id"] for j in client.get(f"{API}/jobs", params={"limit": 1000}).json()["jobs"]}
    assert job_dirs(server) <= listed, job_dirs(server) - listed
    assert client.get(f"{API}/health").status_code == 200
    assert server.proc.poll() is None
