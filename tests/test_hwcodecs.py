"""NVDEC/NVENC detection (lipsync_runner.media.hwcodecs) against fake ffmpeg binaries, and its wiring.

The fake lists the codecs it is told to and takes or refuses the trial frames, like an ffmpeg
build on a machine with or without a usable GPU; every call is logged so the tests can tell what
detection ran.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from lipsync_runner.media import hwcodecs
from lipsync_runner.media.hwcodecs import VideoCodecs, detect, video_codecs

FAKE_FFMPEG = r"""#!/bin/bash
echo "$*" >> "$FAKE_LOG"
case " $* " in
  *" -encoders "*)
    printf 'Encoders:\n V..... = Video\n A..... = Audio\n ------\n'
    for n in libx264 aac $FAKE_ENCODERS; do echo " V....D $n                 a codec"; done; exit 0;;
  *" -decoders "*)
    printf 'Decoders:\n V..... = Video\n ------\n'
    for n in h264 hevc $FAKE_DECODERS; do echo " VFS..D $n                 a codec"; done; exit 0;;
  *" -c:v h264_nvenc "*)
    cat > /dev/null
    if [ "$FAKE_NVENC_OK" = 1 ]; then printf 'nvenc-h264'; exit 0; fi
    echo "[h264_nvenc @ 0x55d8] Cannot load libcuda.so.1" >&2
    echo "[out#0/h264 @ 0x55d8] Nothing was written into output file" >&2; exit 1;;
  *" -c:v h264_cuvid "*)
    cat > /dev/null
    if [ "$FAKE_CUVID_OK" = 1 ]; then exit 0; fi
    echo "[h264_cuvid @ 0x5574] Cannot load libnvcuvid.so.1" >&2; exit 1;;
  *" -c:v libx264 "*)
    cat > /dev/null; printf 'x264-h264'; exit 0;;
esac
echo "unexpected call" >&2; exit 2
"""


@pytest.fixture
def fake_ffmpeg(tmp_path, monkeypatch):
    exe = tmp_path / "ffmpeg"
    exe.write_text(FAKE_FFMPEG)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    log.touch()
    monkeypatch.setenv("FAKE_LOG", str(log))
    hwcodecs.clear_cache()
    yield exe, log
    hwcodecs.clear_cache()


def _gpu(monkeypatch, *, listed: bool, nvenc_ok: bool = False, cuvid_ok: bool = False) -> None:
    monkeypatch.setenv("FAKE_ENCODERS", "h264_nvenc hevc_nvenc" if listed else "")
    monkeypatch.setenv("FAKE_DECODERS", "h264_cuvid hevc_cuvid" if listed else "")
    monkeypatch.setenv("FAKE_NVENC_OK", "1" if nvenc_ok else "0")
    monkeypatch.setenv("FAKE_CUVID_OK", "1" if cuvid_ok else "0")


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_a_working_gpu_gets_nvenc_and_nvdec(fake_ffmpeg, monkeypatch):
    exe, log = fake_ffmpeg
    _gpu(monkeypatch, listed=True, nvenc_ok=True, cuvid_ok=True)
    codecs = detect(str(exe))
    assert codecs == VideoCodecs(encoder="h264_nvenc", hwaccel="cuda", reason=codecs.reason)
    assert codecs.uses_gpu and codecs.reason.startswith("using h264_nvenc and NVDEC")
    trials = [c for c in _calls(log) if "-c:v" in c]
    assert len(trials) == 2  # the NVENC trial's frame is what NVDEC decodes: no libx264 trial


def test_codecs_listed_without_a_usable_gpu_fall_back_to_software_and_say_why(fake_ffmpeg, monkeypatch):
    exe, log = fake_ffmpeg
    _gpu(monkeypatch, listed=True)  # our static ffmpeg on a CPU machine: listed, but no driver
    codecs = detect(str(exe))
    assert codecs.encoder == "libx264" and codecs.hwaccel is None and not codecs.uses_gpu
    assert "h264_nvenc unusable: [h264_nvenc] Cannot load libcuda.so.1" in codecs.reason
    assert "h264_cuvid unusable: [h264_cuvid] Cannot load libnvcuvid.so.1" in codecs.reason
    assert any("-c:v libx264" in c for c in _calls(log))  # an H.264 frame for the NVDEC trial


def test_nvdec_alone_is_used_when_only_the_encoder_fails(fake_ffmpeg, monkeypatch):
    exe, _ = fake_ffmpeg
    _gpu(monkeypatch, listed=True, nvenc_ok=False, cuvid_ok=True)  # e.g. every NVENC session taken
    codecs = detect(str(exe))
    assert (codecs.encoder, codecs.hwaccel) == ("libx264", "cuda")


def test_codecs_not_in_the_build_are_not_tried(fake_ffmpeg, monkeypatch):
    exe, log = fake_ffmpeg
    _gpu(monkeypatch, listed=False, nvenc_ok=True, cuvid_ok=True)
    codecs = detect(str(exe))
    assert codecs.encoder == "libx264" and codecs.hwaccel is None
    assert "ffmpeg has no h264_nvenc" in codecs.reason and "ffmpeg has no h264_cuvid" in codecs.reason
    assert len(_calls(log)) == 2  # -encoders and -decoders only


def test_detection_runs_once_per_ffmpeg_and_can_be_switched_off(fake_ffmpeg, monkeypatch):
    exe, log = fake_ffmpeg
    _gpu(monkeypatch, listed=True, nvenc_ok=True, cuvid_ok=True)
    first = video_codecs("auto", str(exe))
    n = len(_calls(log))
    assert video_codecs("auto", str(exe)) is first and len(_calls(log)) == n  # cached
    monkeypatch.setenv("LIP_SYNC_X264_THREADS", "2")
    assert video_codecs("auto", str(exe)).threads == 2 and len(_calls(log)) == n
    monkeypatch.delenv("LIP_SYNC_X264_THREADS")
    monkeypatch.setenv("LIP_SYNC_HW_CODECS", "off")
    off = video_codecs(ffmpeg=str(exe))  # the setting, read when no mode is given
    assert not off.uses_gpu and "off" in off.reason and len(_calls(log)) == n
    with pytest.raises(ValueError):
        video_codecs("on", str(exe))


def test_the_real_ffmpeg_on_a_machine_without_a_gpu_uses_software_codecs():
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver: what detection finds depends on it")
    hwcodecs.clear_cache()
    codecs = video_codecs("auto")
    assert codecs.encoder == "libx264" and codecs.hwaccel is None, codecs.reason


# --------------------------------------------------------------------------- wiring


ARGV_LOGGER = r"""#!/bin/bash
echo "$*" >> "$ARGV_LOG"
exec "$REAL_FFMPEG" "$@"
"""


@pytest.fixture
def logged_ffmpeg(tmp_path, monkeypatch):
    """The real ffmpeg behind a wrapper that logs every command line."""
    from lipsync_runner.media.ffmpeg import ffmpeg_exe

    real = ffmpeg_exe()
    exe = tmp_path / "ffmpeg-logged"
    exe.write_text(ARGV_LOGGER)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "argv.log"
    log.touch()
    monkeypatch.setenv("REAL_FFMPEG", real)
    monkeypatch.setenv("ARGV_LOG", str(log))
    monkeypatch.setenv("LIP_SYNC_FFMPEG", str(exe))
    return log


def test_the_writer_maps_preset_and_quality_to_nvenc():
    from lipsync_runner.media.ffmpeg import _video_codec_args

    assert _video_codec_args("h264_nvenc", "veryfast", 18) == [
        "-c:v", "h264_nvenc", "-preset", "p2", "-tune", "hq", "-rc", "vbr", "-cq", "18", "-b:v", "0"]
    assert _video_codec_args("libx264", "faster", 20) == ["-c:v", "libx264", "-preset", "faster", "-crf", "20"]
    with pytest.raises(ValueError):
        _video_codec_args("h265_magic", "veryfast", 18)


def test_reader_and_writer_pass_hwaccel_codec_and_threads_to_ffmpeg(logged_ffmpeg, tmp_path):
    from lipsync_runner.media.ffmpeg import VideoReader, VideoWriter, probe_video

    out = tmp_path / "out.mp4"
    frames = np.full((3, 64, 80, 3), 120, np.uint8)
    with VideoWriter(out, 80, 64, 25, codec="libx264", threads=1) as writer:
        writer.write(frames)
    with VideoReader(out, probe_video(out), hwaccel="none") as reader:  # "none": valid everywhere
        assert len(reader.read_chunk(8)) == 3
    calls = logged_ffmpeg.read_text().splitlines()
    assert any("-c:v libx264" in c and "-threads 1" in c for c in calls)
    # the decoder option comes before the input's demuxer whitelist and -i
    assert any(c.startswith("-hide_banner -nostdin -v error -hwaccel none ") and " -i " in c for c in calls)


class _NullModel:
    def audio_features(self, pcm):
        from lipsync_runner.audio import windows as audio

        return np.zeros((audio.step_count(len(pcm)), 5, 384), np.float32)

    def prepare(self, crops):
        return np.zeros((len(crops), 8, 32, 32), np.float32)

    def generate(self, latents, windows):
        return np.full((len(latents), 256, 256, 3), 128, np.uint8)


def test_the_pipeline_decodes_and_encodes_with_the_detected_codecs(logged_ffmpeg, media_dir, tmp_path):
    from lipsync_runner.faces import HaarFaceDetector
    from lipsync_runner.pipeline.job import PipelineOptions, run

    codecs = VideoCodecs(encoder="libx264", hwaccel="none", reason="test", threads=2)
    result = run(_NullModel(), HaarFaceDetector(), media_dir / "face.mp4", media_dir / "speech_short.wav",
                 tmp_path / "out.mp4", PipelineOptions(codecs=codecs))
    assert result.frames == 30
    decodes = [c for c in logged_ffmpeg.read_text().splitlines() if "-f rawvideo -pix_fmt rgb24 pipe:1" in c]
    # one decode pass (the frames are kept for the render), with the detected decoder
    assert len(decodes) == 1 and " -hwaccel none " in decodes[0]
    encodes = [c for c in logged_ffmpeg.read_text().splitlines() if "-c:v libx264" in c]
    assert len(encodes) == 1 and " -threads 2 " in encodes[0]
    assert os.path.getsize(tmp_path / "out.mp4") > 0
