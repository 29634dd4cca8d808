"""Live sessions through the real BentoML server: `WS /api/lip-sync/live` reaches the mounted REST
app through every ASGI middleware of service.py (DocsPage, BearerAuth, BodyGuard, BentoMLSurface)
and BentoML's own app, and its frames come from the runner service."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lipsync_client import LipSyncClient
from lipsync_client.live import read_pcm
from lipsync_runner.media.ffmpeg import ffmpeg_exe
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio


def test_a_live_session_through_the_bentoml_server(open_server, tmp_path: Path):
    clip = write_face_video(tmp_path / "face.mp4", seconds=0.4, fps=25, size=(160, 120))
    speech = write_speech_like_audio(tmp_path / "speech.mp3", seconds=0.4)
    wav = tmp_path / "speech.wav"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(speech), "-ar", "16000", "-ac", "1", "-sample_fmt", "s16",
                    str(wav)], check=True)
    with LipSyncClient(open_server.url, timeout=300) as c:
        avatar = c.wait_avatar(c.create_avatar(clip).avatar_id, timeout=300)
        assert avatar.ready, avatar
        with c.live(avatar.avatar_id) as session:
            assert session.ready["mime"].startswith("video/mp4")
            session.stream(read_pcm(wav), realtime=False)
            received = list(session)
    assert received[0][4:8] == b"ftyp" and any(isinstance(m, bytes) and m[4:8] == b"moof" for m in received)
    end = received[-1]
    assert end["type"] == "end" and end["speech_frames"] == 10 and end["frames"] >= 10, end
