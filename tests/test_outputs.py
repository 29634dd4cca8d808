"""Output controls: output_height, quality and output_format (mp4: H.264 + AAC; webm: VP9 + Opus).

The encoder (media/ffmpeg.py VideoWriter) with real ffmpeg encodes, then whole jobs through the real
server (tiny models on the CPU): the download's name and type follow the format, and a bad value is
a 400 that names the field. The server runs with content credentials off: its MP4s carry no manifest.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
import pytest

from lipsync_client import BadRequest, LipSyncClient, NotFound
from lipsync_runner.media.credentials import read_manifest
from lipsync_runner.media.ffmpeg import VideoWriter, probe_audio, probe_video, scaled_size
from lipsync_runner.media.samples import face_frames, write_speech_like_audio

from .server import Server, running_server

SPEECH_S = 0.8


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return write_speech_like_audio(tmp_path_factory.mktemp("speech") / "speech.wav", seconds=SPEECH_S)


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.stack(list(face_frames(20, size=(320, 180))))


def encode(path: Path, frames: np.ndarray, audio: Path, **options) -> Path:
    with VideoWriter(path, frames.shape[2], frames.shape[1], Fraction(25), audio_path=audio, **options) as writer:
        writer.write(frames)
    return path


# ------------------------------------------------------------------ the encoder


@pytest.mark.parametrize("suffix, video_codec, audio_codec", [(".mp4", "h264", "aac"), (".webm", "vp9", "opus")])
def test_the_container_decides_the_codecs_and_quality_trades_size(tmp_path, frames, speech, suffix, video_codec,
                                                                  audio_codec):
    sizes = {}
    for quality in ("draft", "standard", "high"):
        out = encode(tmp_path / f"{quality}{suffix}", frames, speech, quality=quality)
        video, audio = probe_video(out), probe_audio(out)
        assert (video.codec, audio.codec) == (video_codec, audio_codec)
        assert (video.width, video.height) == (320, 180)
        assert video.duration == pytest.approx(SPEECH_S, abs=0.05)  # the longer of the two: the audio
        sizes[quality] = out.stat().st_size
    assert sizes["draft"] < sizes["standard"] < sizes["high"]


def test_output_height_scales_down_to_an_even_width_and_never_up(tmp_path, frames, speech):
    assert scaled_size(320, 180, 100) == (178, 100)  # 177.8 rounded to even
    assert scaled_size(1920, 1080, 720) == (1280, 720)
    assert scaled_size(321, 181, None) == (322, 182)  # odd sizes padded, as before
    assert scaled_size(320, 180, 360) == (320, 180)  # never up
    for suffix in (".mp4", ".webm"):
        out = probe_video(encode(tmp_path / f"small{suffix}", frames, speech, output_height=100))
        assert (out.width, out.height) == (178, 100)
    same = probe_video(encode(tmp_path / "same.mp4", frames, speech, output_height=1080))
    assert (same.width, same.height) == (320, 180)


# ------------------------------------------------------------------ jobs through the service


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("outputs-server"), models_dir,
                        LIP_SYNC_CONTENT_CREDENTIALS="false") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> LipSyncClient:
    with LipSyncClient(server.url, timeout=120) as c:
        yield c


def test_a_webm_job_downloads_as_webm_with_vp9_and_opus(client, server, media_dir, speech, tmp_path):
    job = client.generate(media_dir / "face.mp4", speech, wait=True, output_format="webm", quality="draft")
    assert job.completed and job.output_path == f"lip_sync_{job.job_id}.webm"
    answer = httpx.get(f"{server.url}/api/lip-sync/download/{job.job_id}", timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "video/webm"
    assert f'filename="lip_sync_{job.job_id}.webm"' in answer.headers["content-disposition"]
    out = tmp_path / "out.webm"
    out.write_bytes(answer.content)
    video, audio = probe_video(out), probe_audio(out)
    assert (video.codec, audio.codec, video.demuxer) == ("vp9", "opus", "matroska")
    assert (video.width, video.height) == (320, 240)
    assert video.duration == pytest.approx(SPEECH_S, abs=0.05) and audio.duration == pytest.approx(SPEECH_S, abs=0.05)
    into_folder = client.download(job.job_id, tmp_path)  # a directory: the server's name, with its suffix
    assert into_folder == tmp_path / f"lip_sync_{job.job_id}.webm" and into_folder.read_bytes() == answer.content


def test_output_height_gives_that_height_and_the_mp4_carries_no_manifest_with_credentials_off(
        client, server, media_dir, speech, tmp_path):
    job = client.generate(media_dir / "face.mp4", speech, wait=True, output_height=120)
    out = client.download(job.job_id, tmp_path / "small.mp4")
    answer = httpx.head(f"{server.url}/api/lip-sync/download/{job.job_id}", timeout=30)
    assert answer.headers["content-type"] == "video/mp4" and job.output_path.endswith(".mp4")
    video = probe_video(out)
    assert (video.width, video.height, video.codec) == (160, 120, "h264")
    assert read_manifest(out) is None  # LIP_SYNC_CONTENT_CREDENTIALS=false: nothing signed
    with pytest.raises(NotFound, match="no content credentials"):
        client.credentials(job.job_id)
    assert "DEVELOPMENT certificate" not in server.log.read_text()  # off: no signer, no development pair
    assert not (server.data_dir / "signing-dev").exists()


@pytest.mark.parametrize("field, value", [("output_height", "121"), ("output_height", "8"), ("quality", "best"),
                                          ("output_format", "mov")])
def test_a_bad_output_value_is_a_400_that_names_the_field(client, media_dir, speech, field, value):
    with pytest.raises(BadRequest, match=field):
        client.generate(media_dir / "face.mp4", speech, **{field: value})
