"""Progressive output: a job's video is playable while it renders (media/hls.py).

The writer's ``tee`` gives the MP4 and an HLS playlist of fMP4 segments from one encode; a listed
segment is complete wherever it is read, the list ends whatever way the encode ends, and the segments
of a finished job hold exactly the MP4's frames. Against the real server (tiny models): the playlist of
a running job is readable and its segments decode, only its owner reads it, the status says how far it
goes, cleanup removes it, and the web page plays the running job in headless Chromium.
"""

from __future__ import annotations

import subprocess
import time
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest

from lipsync_runner.media.ffmpeg import VideoWriter, ffmpeg_exe
from lipsync_runner.media.hls import LOCAL_PLAYLIST, PLAYLIST_NAME, HlsOutput, Playlist, stored_name
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

from .server import Server, running_server

API = "/api/lip-sync"
OWNER, OTHER = "progressive-owner", "progressive-other"


# --------------------------------------------------------------------------- helpers


def packet_hashes(path: Path, stream: str) -> list[str]:
    """The MD5 of every packet's data of one stream (``v`` or ``a``): the encoded frames. (Not their side
    data: the MP4's edit list trims the AAC encoder's priming, which the fMP4 segments leave in, 21 ms.)"""
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", f"0:{stream}", "-c", "copy",
                          "-f", "framemd5", "-"], capture_output=True, text=True, check=True).stdout
    return [line.split(",")[5].strip() for line in out.splitlines() if line and not line.startswith("#")]


def frame_hashes(path: Path) -> list[str]:
    """The MD5 of every decoded video frame (ffmpeg fails on a segment it cannot decode)."""
    out = subprocess.run([ffmpeg_exe(), "-v", "error", "-xerror", "-i", str(path), "-map", "0:v", "-f", "framemd5",
                          "-"], capture_output=True, text=True, check=True).stdout
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def listed(playlist_text: str) -> list[str]:
    return [line for line in playlist_text.splitlines() if line and not line.startswith("#")]


def joined(parts: list[bytes], dest: Path) -> Path:
    """An fMP4 init segment followed by media segments is one playable file."""
    dest.write_bytes(b"".join(parts))
    return dest


def write_frames(writer: VideoWriter, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (writer.height, writer.width, 3), dtype=np.uint8)
    for i in range(n):
        writer.write(np.roll(base, 3 * i, axis=1))


# --------------------------------------------------------------------------- the writer


def test_the_segments_carry_the_mp4s_own_packets_audio_included(tmp_path):
    audio = write_speech_like_audio(tmp_path / "speech.wav", seconds=3.0)
    stored: dict[str, bytes] = {}
    updates: list[tuple[float, bool]] = []
    out = HlsOutput(tmp_path, segment_s=1.0, publish=lambda name, path: stored.__setitem__(name, path.read_bytes()),
                    progress=lambda seconds, ended: updates.append((seconds, ended)))
    with VideoWriter(tmp_path / "output.mp4", 161, 121, Fraction(25), audio_path=audio, hls=out) as writer:
        write_frames(writer, 75)

    playlist = stored[PLAYLIST_NAME].decode()
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST")
    assert '#EXT-X-MAP:URI="live/init.mp4"' in playlist and "#EXT-X-PLAYLIST-TYPE:EVENT" in playlist
    names = listed(playlist)
    assert len(names) >= 3 and all(n.startswith("live/seg") for n in names)
    parts = [stored[stored_name("init.mp4")]] + [stored[stored_name(n.removeprefix("live/"))] for n in names]
    hls = joined(parts, tmp_path / "joined.mp4")
    mp4 = tmp_path / "output.mp4"
    assert packet_hashes(hls, "v") == packet_hashes(mp4, "v")  # one encode: the very same packets
    assert len(frame_hashes(hls)) == 75 and frame_hashes(hls) == frame_hashes(mp4)
    assert packet_hashes(hls, "a") == packet_hashes(mp4, "a")  # the sound is in the segments too
    # the status learns each step; the last says the whole video and that the list has ended
    assert updates[-1] == (pytest.approx(3.0, abs=0.05), True)
    assert all(not ended for _, ended in updates[:-1])


def test_a_listed_segment_is_always_whole_and_the_list_ends_when_the_encode_is_aborted(tmp_path):
    seen: list[str] = []  # every playlist as published, checked the moment it appears

    def publish(name: str, path: Path) -> None:
        if name == PLAYLIST_NAME:
            text = path.read_text()
            seen.append(text)
            for served in listed(text):  # already stored, whole: init + it decodes
                init = (tmp_path / stored_name("init.mp4")).read_bytes()
                segment = (tmp_path / stored_name(served.removeprefix("live/"))).read_bytes()
                assert len(frame_hashes(joined([init, segment], tmp_path / "one.mp4"))) == 25

    writer = VideoWriter(tmp_path / "output.mp4", 64, 48, Fraction(25), hls=HlsOutput(tmp_path, 1.0, publish))
    assert not (tmp_path / LOCAL_PLAYLIST).exists() and not seen  # nothing playable, nothing published
    try:
        write_frames(writer, 100)  # x264 holds a few frames back: segment 2 (frames 25-49) is cut by now
        deadline = time.monotonic() + 30
        while not any(len(listed(text)) >= 2 for text in seen):  # published while the encode still runs
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
        assert "#EXT-X-ENDLIST" not in seen[-1]
    finally:
        writer.abort()  # a failed or cancelled job: no MP4, and the playlist ends with what was whole
    assert not (tmp_path / "output.mp4").exists()
    assert seen[-1].rstrip().endswith("#EXT-X-ENDLIST") and len(listed(seen[-1])) >= 2
    assert not list(tmp_path.glob("live-*.tmp"))


def test_with_a_bucket_each_segment_is_stored_before_a_playlist_lists_it_and_goes_with_the_job(s3, tmp_path):
    """The fleet: the worker's writer stores into the bucket; any replica reads the playlist from there."""
    import uuid

    from lipsync_runner.jobs import new_job_id
    from lipsync_runner.storage.s3 import S3Storage

    storage = S3Storage(s3.create_bucket(), f"p-{uuid.uuid4().hex[:8]}", endpoint_url=s3.endpoint_url,
                        client=s3.client())
    job_id = new_job_id()
    checked: list[int] = []

    def publish(name: str, path: Path) -> None:
        storage.put(job_id, name, path)
        if name == PLAYLIST_NAME:  # what a reader on another replica sees right now
            text = fetched(PLAYLIST_NAME).decode()
            init = fetched(stored_name("init.mp4"))
            for served in listed(text):
                segment = fetched(stored_name(served.removeprefix("live/")))
                assert len(frame_hashes(joined([init, segment], tmp_path / "read.mp4"))) == 25
            checked.append(len(listed(text)))

    def fetched(name: str) -> bytes:
        obj = storage.open(job_id, name)
        return b"".join(obj.iter_range(0, obj.size))

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with VideoWriter(scratch / "output.mp4", 64, 48, Fraction(25), hls=HlsOutput(scratch, 1.0, publish)) as writer:
        write_frames(writer, 75)
    assert checked[-1] == 3 and fetched(PLAYLIST_NAME).decode().rstrip().endswith("#EXT-X-ENDLIST")
    storage.delete(job_id)  # cleanup and expiry: the job's files, its segments among them
    assert s3.keys(storage.bucket, f"{storage.prefix}jobs/{job_id}/") == []


def test_only_the_progressive_outputs_own_names_are_served():
    assert stored_name("seg00012.m4s") == "live-seg00012.m4s" and stored_name("init.mp4") == "live-init.mp4"
    for name in ("output.mp4", "input_video.mp4", "..", "seg1.m4s", "seg00001.m4s/x", "live.m3u8", ""):
        assert stored_name(name) is None
    assert Playlist.parse("#EXTM3U\n#EXTINF:2.0,\nlive-seg00000.m4s\n#EXT-X-ENDLIST\n").ended


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    with running_server(tmp_path_factory.mktemp("progressive"), models_dir, LIP_SYNC_API_TOKENS=f"{OWNER},{OTHER}",
                        LIP_SYNC_SCOPE_JOBS_TO_TOKEN="true", LIP_SYNC_PROGRESSIVE_SEGMENT_S="0.5",
                        LIP_SYNC_JOB_WORKERS="2") as srv:
        yield srv


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """A 2 s face video; 60 s of speech (a job still running whatever this machine's speed: the tests that
    watch it cancel it) and 2 s (a job that finishes)."""
    root = tmp_path_factory.mktemp("progressive-media")
    return {"video": write_face_video(root / "face.mp4", seconds=2.0, fps=25, size=(320, 240)),
            "long": write_speech_like_audio(root / "long.wav", seconds=60.0),
            "short": write_speech_like_audio(root / "short.wav", seconds=2.0)}


def client(server: Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def submit(c: httpx.Client, video: Path, audio: Path) -> str:
    with video.open("rb") as v, audio.open("rb") as a:
        r = c.post(f"{API}/generate", files={"video": (video.name, v, "video/mp4"),
                                             "audio": (audio.name, a, "audio/wav")})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def status_when(c: httpx.Client, job_id: str, ok, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = c.get(f"{API}/status/{job_id}").json()
        if ok(body):
            return body
        assert time.monotonic() < deadline and body["status"] in ("queued", "processing"), body
        time.sleep(0.1)


@pytest.fixture(scope="module")
def running_job(server, media) -> str:
    """A long job, watched once its first second is playable (cancelled by the last test that uses it)."""
    with client(server, OWNER) as c:
        job_id = submit(c, media["video"], media["long"])
        status_when(c, job_id, lambda b: (b["progressive"] or {}).get("playable_seconds", 0) >= 1)
        yield job_id
        c.post(f"{API}/cancel/{job_id}")


def test_a_running_jobs_playlist_is_readable_its_segments_decode_and_only_its_owner_reads_it(
        server, running_job, tmp_path):
    job_id = running_job
    live = f"{API}/jobs/{job_id}/live.m3u8"
    with client(server, OWNER) as c, client(server, OTHER) as other:
        r = c.get(live)
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/vnd.apple.mpegurl")
        assert r.headers["cache-control"] == "no-cache" and "#EXT-X-ENDLIST" not in r.text
        status = c.get(f"{API}/status/{job_id}").json()
        assert status["status"] == "processing", "the long job ended: it cannot be watched while running"
        assert status["progressive"]["playlist"] == live and status["progressive"]["ended"] is False
        assert status["progressive"]["playable_seconds"] >= 0.5 * len(listed(r.text)) - 0.1

        init = c.get(f"{API}/jobs/{job_id}/live/init.mp4")
        assert init.status_code == 200 and init.headers["content-type"] == "video/mp4"
        assert len(listed(r.text)) >= 2
        for served in listed(r.text):  # every listed segment is whole and decodes
            segment = c.get(f"{API}/jobs/{job_id}/{served}")
            assert segment.status_code == 200 and segment.headers["content-type"] == "video/mp4"
            assert frame_hashes(joined([init.content, segment.content], tmp_path / "seg.mp4"))

        # the same auth and tenancy as the job's other reads
        for path in (live, f"{API}/jobs/{job_id}/live/init.mp4", f"{API}/jobs/{job_id}/{listed(r.text)[0]}"):
            assert other.get(path).status_code == 404
            assert httpx.get(server.url + path).status_code == 401
        # only the progressive output's own files, none listed yet is served
        for name in ("output.mp4", "input_audio.wav", "thumbnail.jpg", "seg99999.m4s"):
            assert c.get(f"{API}/jobs/{job_id}/live/{name}").status_code == 404


def test_the_web_page_plays_a_running_job(server, running_job, browser):
    job_id = running_job
    context = browser.new_context()
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # the page resumes the tab's job with the tab's token (as after a reload)
        page.add_init_script(f"sessionStorage.setItem('lipsync.token', '{OWNER}');"
                             f"sessionStorage.setItem('lipsync.job', '{job_id}');")
        page.goto(server.url + "/ui/")
        page.wait_for_function("() => { const v = document.getElementById('live-video');"
                               " return !v.hidden && v.readyState >= 2 && v.videoWidth === 320; }", timeout=60_000)
        assert page.evaluate("() => document.getElementById('live-video').src").startswith("blob:"), \
            "played through Media Source Extensions (hls.js)"
        page.evaluate("() => { const v = document.getElementById('live-video'); v.muted = true; return v.play(); }")
        page.wait_for_function("() => document.getElementById('live-video').currentTime > 0.3", timeout=60_000)
        with client(server, OWNER) as c:
            assert c.get(f"{API}/status/{job_id}").json()["status"] == "processing", \
                "the long job ended: the page did not play it while it ran"
        assert not errors, errors
    finally:
        context.close()


def test_a_cancelled_jobs_playlist_ends_with_what_was_rendered(server, running_job, tmp_path):
    job_id = running_job
    with client(server, OWNER) as c:
        assert c.post(f"{API}/cancel/{job_id}").status_code == 200
        done = status_when(c, job_id, lambda b: b["status"] == "cancelled")
        assert done["progressive"]["ended"] is True and 0 < done["progressive"]["playable_seconds"] < 60
        final = c.get(f"{API}/jobs/{job_id}/live.m3u8").text
        assert final.rstrip().endswith("#EXT-X-ENDLIST")
        parts = [c.get(f"{API}/jobs/{job_id}/live/init.mp4").content]
        parts += [c.get(f"{API}/jobs/{job_id}/{served}").content for served in listed(final)]
        frames = frame_hashes(joined(parts, tmp_path / "cancelled.mp4"))
        assert len(frames) == pytest.approx(25 * done["progressive"]["playable_seconds"], abs=1)


def test_a_finished_jobs_segments_hold_the_mp4s_frames_and_go_with_its_files(server, media, tmp_path):
    with client(server, OWNER) as c:
        job_id = submit(c, media["video"], media["short"])
        live = f"{API}/jobs/{job_id}/live.m3u8"
        done = status_when(c, job_id, lambda b: b["status"] == "completed")
        assert done["progressive"] == {"playlist": live, "playable_seconds": pytest.approx(2.0, abs=0.05),
                                       "ended": True}
        final = c.get(live).text
        assert final.rstrip().endswith("#EXT-X-ENDLIST") and len(listed(final)) == 4  # 2 s in 0.5 s segments
        parts = [c.get(f"{API}/jobs/{job_id}/live/init.mp4").content]
        parts += [c.get(f"{API}/jobs/{job_id}/{served}").content for served in listed(final)]
        mp4 = tmp_path / "output.mp4"
        mp4.write_bytes(c.get(f"{API}/download/{job_id}").content)
        assert frame_hashes(joined(parts, tmp_path / "joined.mp4")) == frame_hashes(mp4)
        assert len(frame_hashes(mp4)) == 50

        # cleanup (as expiry) removes it with the job's other files
        assert c.delete(f"{API}/cleanup/{job_id}").status_code == 200
        assert c.get(live).status_code == 404
        assert c.get(f"{API}/jobs/{job_id}/live/init.mp4").status_code == 404
