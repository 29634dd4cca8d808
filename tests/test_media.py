"""Spec for lipsync_runner.media.ffmpeg: probing, validation, streaming decode and encode.

Inputs are synthesised with the same ffmpeg binary from lavfi sources (testsrc2,
sine) at 160x120 so the whole file runs in seconds.
"""

from __future__ import annotations

import subprocess
import time
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from lipsync_runner.media import ffmpeg as media
from lipsync_runner.errors import InputTooLargeError, InvalidInputError, MediaProcessingError
from lipsync_runner.media.ffmpeg import (
    AudioInfo,
    MediaLimits,
    VideoInfo,
    VideoReader,
    VideoWriter,
    decode_audio,
    exact_frame_rate,
    probe_audio,
    probe_video,
)

from .hostile_media import (ffconcat, hls_playlist, mkv_with_huge_metadata, mp4_with_sample_durations,
                            wav_with_header)

W, H = 160, 120


def ffmpeg(*args: str | Path) -> None:
    subprocess.run(
        [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", *map(str, args)],
        check=True,
        capture_output=True,
    )


def lavfi_video(seconds: float, rate: str = "30", size: str = f"{W}x{H}") -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=s={size}:r={rate}:d={seconds}"]


def sine(seconds: float, freq: int = 440, rate: int = 44100) -> list[str]:
    return ["-f", "lavfi", "-i", f"sine=f={freq}:r={rate}:d={seconds}"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def dominant_frequency(samples: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / sample_rate)[np.argmax(spectrum)])


def smooth_frames(n: int, width: int = W, height: int = H) -> np.ndarray:
    """Moving gradients: natural-image-like content that H.264 at crf 18 keeps near-lossless."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, ..., 0] = 128 + 100 * np.sin((x + 3 * i) / 23.0)
        frames[i, ..., 1] = 128 + 100 * np.cos((y - 2 * i) / 19.0)
        frames[i, ..., 2] = (x + y + 4 * i) % 256 * 0.5 + 60
    return frames


VIDEO_CODECS = {  # container -> (video encoder args, audio encoder args, expected probed codec)
    ".mp4": (["-c:v", "libx264"], ["-c:a", "aac"], "h264"),
    ".mov": (["-c:v", "libx264"], ["-c:a", "aac"], "h264"),
    ".mkv": (["-c:v", "libx264"], ["-c:a", "aac"], "h264"),
    ".avi": (["-c:v", "mpeg4"], ["-c:a", "libmp3lame"], "mpeg4"),
    ".webm": (["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8"], ["-c:a", "libopus"], "vp8"),
}

AUDIO_CODECS = {  # extension -> (encoder args, expected probed codec)
    ".wav": (["-c:a", "pcm_s16le"], "pcm_s16le"),
    ".mp3": (["-c:a", "libmp3lame"], "mp3"),
    ".m4a": (["-c:a", "aac"], "aac"),
    ".aac": (["-c:a", "aac"], "aac"),
    ".ogg": (["-c:a", "libvorbis"], "vorbis"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared inputs, built once: 2 s clips in every container, 1 s tones in every audio format."""
    d = tmp_path_factory.mktemp("media")
    for ext, (vcodec, acodec, _) in VIDEO_CODECS.items():
        ffmpeg(*lavfi_video(2), *sine(2), *vcodec, "-pix_fmt", "yuv420p", *acodec, d / f"clip{ext}")
    for ext, (acodec, _) in AUDIO_CODECS.items():
        ffmpeg(*sine(1), *acodec, d / f"tone{ext}")
    ffmpeg(*lavfi_video(2), "-c:v", "libx264", "-pix_fmt", "yuv420p", d / "silent.mp4")
    return d


def assert_names_only_basename(exc: pytest.ExceptionInfo[BaseException], path: Path) -> None:
    text = str(exc.value)
    assert path.name in text
    assert str(path.parent) not in text, "error messages must not leak server paths"
    assert "Traceback" not in text


# --------------------------------------------------------------------------- ffmpeg binary


def test_ffmpeg_exe_defaults_to_the_imageio_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    import imageio_ffmpeg

    monkeypatch.delenv("LIP_SYNC_FFMPEG", raising=False)
    assert media.ffmpeg_exe() == imageio_ffmpeg.get_ffmpeg_exe()


def test_ffmpeg_exe_can_be_overridden_by_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = media.ffmpeg_exe()
    monkeypatch.setenv("LIP_SYNC_FFMPEG", real)
    assert media.ffmpeg_exe() == real
    monkeypatch.setenv("LIP_SYNC_FFMPEG", str(tmp_path / "no-such-ffmpeg"))
    with pytest.raises(MediaProcessingError, match="LIP_SYNC_FFMPEG"):
        media.ffmpeg_exe()


# --------------------------------------------------------------------------- probe_video


@pytest.mark.parametrize("ext", media.VIDEO_EXTENSIONS)
def test_probe_video_reads_every_supported_container(clips: Path, ext: str) -> None:
    info = probe_video(clips / f"clip{ext}")
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height) == (W, H)
    assert info.fps == 30 and isinstance(info.fps, Fraction)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert info.frame_count_estimate == pytest.approx(60, abs=1)
    assert info.codec == VIDEO_CODECS[ext][2]
    assert info.has_audio is True
    assert info.rotation == 0


def test_probe_video_reports_a_missing_audio_track(clips: Path) -> None:
    assert probe_video(clips / "silent.mp4").has_audio is False


def test_probe_video_gives_ntsc_rates_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ntsc.mp4"
    ffmpeg(*lavfi_video(1, rate="30000/1001"), "-c:v", "libx264", path)
    assert probe_video(path).fps == Fraction(30000, 1001)  # ffmpeg itself prints "29.97 fps"


@pytest.mark.parametrize(
    ("printed", "exact"),
    [
        ("29.97", Fraction(30000, 1001)),
        ("23.98", Fraction(24000, 1001)),
        ("47.95", Fraction(48000, 1001)),
        ("59.94", Fraction(60000, 1001)),
        ("119.88", Fraction(120000, 1001)),
        ("30", Fraction(30)),
        ("25", Fraction(25)),
        ("12.5", Fraction(25, 2)),
        ("1k", Fraction(1000)),
    ],
)
def test_exact_frame_rate_snaps_rounded_rates_to_rationals(printed: str, exact: Fraction) -> None:
    assert exact_frame_rate(printed) == exact


def test_probe_video_dimensions_are_after_autorotation(tmp_path: Path, clips: Path) -> None:
    # A phone portrait clip: stored landscape, display matrix says "turn 90 degrees clockwise".
    rotated = tmp_path / "portrait.mp4"
    ffmpeg("-display_rotation", "-90", "-i", clips / "silent.mp4", "-c", "copy", rotated)
    info = probe_video(rotated)
    assert info.rotation == 90
    assert (info.width, info.height) == (H, W)

    with VideoReader(clips / "silent.mp4") as upright, VideoReader(rotated, info) as turned:
        a, b = upright.read_chunk(1)[0], turned.read_chunk(1)[0]
    assert b.shape == (W, H, 3)
    assert psnr(np.rot90(a, k=-1), b) > 40  # the reader delivers the picture as displayed


def test_probe_video_of_vfr_input_picks_the_nominal_rate(tmp_path: Path) -> None:
    # 30 fps for one second then 15 fps: the average rate is ~23.7, the nominal rate 30.
    path = tmp_path / "vfr.mp4"
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=s={W}x{H}:r=30:d=2,select='lt(n\\,30)+not(mod(n\\,2))'",
           *sine(2), "-fps_mode", "vfr", "-c:v", "libx264", "-c:a", "aac", path)  # fmt: skip
    info = probe_video(path)
    assert info.fps == 30
    with VideoReader(path, info) as reader:
        n = sum(1 for _ in reader)
    # CFR output: frames fill the gaps, so frame i sits at i/30 s like the 2 s of audio.
    assert n == pytest.approx(60, abs=1)


# --------------------------------------------------------------------------- probe_video errors


def test_empty_file_is_not_a_video(tmp_path: Path) -> None:
    path = tmp_path / "input.mp4"
    path.touch()
    with pytest.raises(InvalidInputError, match=r"input\.mp4 is not a video file") as exc:
        probe_video(path)
    assert exc.value.http_status == 400
    assert_names_only_basename(exc, path)


def test_text_renamed_mp4_is_not_a_readable_video(tmp_path: Path) -> None:
    path = tmp_path / "input.mp4"
    path.write_text("this is not a video\n" * 50)
    with pytest.raises(InvalidInputError, match=r"input\.mp4 is not a readable video file") as exc:
        probe_video(path)
    assert_names_only_basename(exc, path)


def test_truncated_mp4_is_rejected(tmp_path: Path, clips: Path) -> None:
    # Plain mp4: the index (moov) is at the end, so the first half cannot even be opened.
    data = (clips / "clip.mp4").read_bytes()
    path = tmp_path / "input.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match=r"input\.mp4 is not a readable video file") as exc:
        probe_video(path)
    assert_names_only_basename(exc, path)


def test_truncated_faststart_mp4_is_rejected(tmp_path: Path) -> None:
    # With the index up front the header still promises 4 s; the packet scan finds the cut.
    full = tmp_path / "full.mp4"
    ffmpeg(*lavfi_video(4), "-c:v", "libx264", "-movflags", "+faststart", full)
    data = full.read_bytes()
    path = tmp_path / "input.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match=r"input\.mp4 is not a readable video file: it is truncated"):
        probe_video(path)


def test_audio_only_file_has_no_video_stream(tmp_path: Path, clips: Path) -> None:
    path = tmp_path / "input.mp4"
    path.write_bytes((clips / "tone.m4a").read_bytes())
    with pytest.raises(InvalidInputError, match=r"input\.mp4 is not a video file: it has no video stream"):
        probe_video(path)


def test_mp3_cover_art_is_not_a_video_stream(tmp_path: Path, clips: Path) -> None:
    cover = tmp_path / "cover.png"
    ffmpeg(*lavfi_video(1), "-frames:v", "1", cover)
    song = tmp_path / "song.mp3"
    ffmpeg("-i", clips / "tone.mp3", "-i", cover, "-map", "0", "-map", "1", "-c", "copy",
           "-disposition:v", "attached_pic", song)  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"song\.mp3 is not a video file: it has no video stream"):
        probe_video(song)
    assert probe_audio(song).codec == "mp3"


@pytest.mark.parametrize("image_ext", [".png", ".jpg"])
def test_still_image_renamed_mp4_is_rejected(tmp_path: Path, image_ext: str) -> None:
    image = tmp_path / f"photo{image_ext}"
    ffmpeg(*lavfi_video(1), "-frames:v", "1", image)
    path = tmp_path / "input.mp4"
    path.write_bytes(image.read_bytes())
    with pytest.raises(InvalidInputError, match=r"input\.mp4 is not a video file: it is a still image"):
        probe_video(path)


def test_file_names_are_never_read_as_ffmpeg_protocols(
    tmp_path: Path, clips: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("http:clip.mp4").write_bytes((clips / "clip.mp4").read_bytes())
    assert probe_video("http:clip.mp4").width == W


def test_missing_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"nothing\.mp4 does not exist"):
        probe_video(tmp_path / "nothing.mp4")


# --------------------------------------------------------------------------- audio


@pytest.mark.parametrize("ext", media.AUDIO_EXTENSIONS)
def test_probe_audio_reads_every_supported_format(clips: Path, ext: str) -> None:
    info = probe_audio(clips / f"tone{ext}")
    assert isinstance(info, AudioInfo)
    assert info.duration == pytest.approx(1.0, abs=0.06)
    assert info.sample_rate == 44100
    assert info.channels == 1
    assert info.codec == AUDIO_CODECS[ext][1]


def test_probe_audio_counts_channels(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    ffmpeg(*sine(0.5), "-ac", "2", "-ar", "48000", path)
    info = probe_audio(path)
    assert (info.channels, info.sample_rate) == (2, 48000)


def test_probe_audio_reads_a_videos_audio_track(clips: Path) -> None:
    info = probe_audio(clips / "clip.mp4")
    assert info.codec == "aac"
    assert info.duration == pytest.approx(2.0, abs=0.06)


@pytest.mark.parametrize("ext", media.AUDIO_EXTENSIONS)
def test_decode_audio_gives_16k_mono_float32(clips: Path, ext: str) -> None:
    audio = decode_audio(clips / f"tone{ext}")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(audio) == pytest.approx(16000, abs=800)  # encoder padding, at most ~50 ms
    assert np.abs(audio).max() <= 1.0
    assert dominant_frequency(audio, 16000) == pytest.approx(440, abs=2)


def test_decode_audio_from_a_videos_audio_track(clips: Path) -> None:
    audio = decode_audio(clips / "clip.mkv")
    assert len(audio) == pytest.approx(32000, abs=800)
    assert dominant_frequency(audio, 16000) == pytest.approx(440, abs=2)


def test_decode_audio_resamples_to_the_requested_rate(clips: Path) -> None:
    audio = decode_audio(clips / "tone.wav", sample_rate=8000)
    assert len(audio) == 8000
    assert dominant_frequency(audio, 8000) == pytest.approx(440, abs=2)


def test_video_without_audio_has_no_audio_stream(tmp_path: Path, clips: Path) -> None:
    path = tmp_path / "input.mp4"
    path.write_bytes((clips / "silent.mp4").read_bytes())
    with pytest.raises(InvalidInputError, match=r"input\.mp4 has no audio stream") as exc:
        probe_audio(path)
    assert_names_only_basename(exc, path)
    with pytest.raises(InvalidInputError, match=r"input\.mp4 has no audio stream"):
        decode_audio(path)


@pytest.mark.parametrize("content", [b"", b"RIFF not really a wave file" * 20])
def test_unreadable_audio_is_invalid_input(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "speech.wav"
    path.write_bytes(content)
    with pytest.raises(InvalidInputError, match=r"speech\.wav is not a (readable )?audio file"):
        probe_audio(path)
    with pytest.raises(InvalidInputError, match=r"speech\.wav"):
        decode_audio(path)


# --------------------------------------------------------------------------- VideoReader


def test_reader_streams_rgb_frames(clips: Path) -> None:
    with VideoReader(clips / "clip.mp4") as reader:
        frames = list(reader)
    assert len(frames) == 60
    assert all(f.shape == (H, W, 3) and f.dtype == np.uint8 for f in frames)


def test_read_chunk_returns_up_to_n_frames_then_empty(clips: Path) -> None:
    with VideoReader(clips / "clip.webm") as reader:
        sizes = []
        while (chunk := reader.read_chunk(25)).shape[0]:
            assert chunk.shape[1:] == (H, W, 3)
            sizes.append(chunk.shape[0])
        assert sizes == [25, 25, 10]
        assert reader.read_chunk(25).shape == (0, H, W, 3)


def test_reader_memory_does_not_grow_with_video_length(tmp_path: Path) -> None:
    path = tmp_path / "long.mp4"
    ffmpeg(*lavfi_video(20), "-c:v", "libx264", "-preset", "ultrafast", path)  # 600 frames, ~35 MB of RGB
    tracemalloc.start()
    try:
        total = 0
        with VideoReader(path) as reader:
            while n := reader.read_chunk(16).shape[0]:  # each chunk is dropped right away
                total += n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 600
    assert peak < 4 * 16 * W * H * 3  # a few chunks' worth, not the whole video


def test_reader_stops_ffmpeg_when_closed_early(clips: Path) -> None:
    reader = VideoReader(clips / "clip.mp4")
    first = next(iter(reader))
    assert first.shape == (H, W, 3)
    reader.close()
    assert reader._ff.proc.poll() is not None
    reader.close()  # idempotent


def test_reader_failure_is_a_media_processing_error_with_ffmpeg_output(tmp_path: Path, clips: Path) -> None:
    path = tmp_path / "input.mp4"
    path.write_bytes((clips / "clip.mp4").read_bytes())
    info = probe_video(path)
    path.write_bytes(b"garbage" * 1000)  # replaced between validation and decoding
    with pytest.raises(MediaProcessingError, match=r"ffmpeg failed while decoding input\.mp4") as exc:
        with VideoReader(path, info) as reader:
            list(reader)
    assert exc.value.http_status == 500
    assert_names_only_basename(exc, path)


def test_reader_timeout_kills_ffmpeg(tmp_path: Path) -> None:
    path = tmp_path / "input.mp4"
    ffmpeg(*lavfi_video(4), "-c:v", "libx264", "-preset", "ultrafast", path)
    with pytest.raises(MediaProcessingError, match="timed out"):
        with VideoReader(path, timeout_s=0.3) as reader:
            reader.read_chunk(1)
            time.sleep(0.6)  # ffmpeg is blocked on the full pipe when the watchdog fires
            while reader.read_chunk(8).shape[0]:
                pass


# --------------------------------------------------------------------------- VideoWriter


def test_round_trip_preserves_frames(tmp_path: Path) -> None:
    frames = smooth_frames(30)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, W, H, Fraction(25)) as writer:
        writer.write(frames[:10])  # a batch
        for frame in frames[10:]:
            writer.write(frame)  # single frames
    info = probe_video(out)
    assert (info.width, info.height, info.fps, info.codec) == (W, H, 25, "h264")
    with VideoReader(out, info) as reader:
        back = np.stack(list(reader))
    assert back.shape == frames.shape
    assert psnr(frames, back) > 35


def test_ntsc_rate_round_trip_does_not_drift(tmp_path: Path) -> None:
    fps = Fraction(30000, 1001)
    out = tmp_path / "ntsc.mp4"
    frame = smooth_frames(1)[0]
    with VideoWriter(out, W, H, fps, preset="ultrafast") as writer:
        for _ in range(300):
            writer.write(frame)
    info = probe_video(out)
    assert info.fps == fps
    assert info.duration == pytest.approx(300 / fps, abs=1 / 29.97)  # 10.01 s, not 10.00
    with VideoReader(out, info) as reader:
        assert sum(1 for _ in reader) == 300


def test_writer_muxes_the_audio_as_aac(tmp_path: Path, clips: Path) -> None:
    out = tmp_path / "talking.mp4"
    with VideoWriter(out, W, H, Fraction(25), audio_path=clips / "tone.wav") as writer:
        writer.write(smooth_frames(25))
    audio = probe_audio(out)
    assert audio.codec == "aac"
    assert audio.duration == pytest.approx(1.0, abs=0.05)
    assert probe_video(out).has_audio


def test_writer_keeps_the_whole_audio_track(tmp_path: Path) -> None:
    # No -shortest: a video shorter than its speech must not silently lose the speech.
    speech = tmp_path / "speech.wav"
    ffmpeg(*sine(2), speech)
    out = tmp_path / "out.mp4"
    with VideoWriter(out, W, H, Fraction(25), audio_path=speech) as writer:
        writer.write(smooth_frames(10))
    assert probe_audio(out).duration == pytest.approx(2.0, abs=0.05)


def test_writer_pads_odd_sizes_to_even(tmp_path: Path) -> None:
    out = tmp_path / "odd.mp4"
    with VideoWriter(out, 161, 121, Fraction(25)) as writer:
        writer.write(smooth_frames(5, width=161, height=121))
    info = probe_video(out)
    assert (info.width, info.height) == (162, 122)  # yuv420p needs even sizes: one pixel of padding


def test_writer_leaves_nothing_when_the_with_block_fails(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="model crashed"):
        with VideoWriter(out, W, H, Fraction(25)) as writer:
            writer.write(smooth_frames(5))
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary file


def test_writer_leaves_nothing_when_ffmpeg_fails(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(MediaProcessingError, match=r"ffmpeg failed while encoding out\.mp4") as exc:
        with VideoWriter(out, W, H, Fraction(25), preset="no-such-preset") as writer:
            for _ in range(50):
                writer.write(smooth_frames(5))
    assert_names_only_basename(exc, out)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_a_bad_audio_file_up_front(tmp_path: Path, clips: Path) -> None:
    out = tmp_path / "out.mp4"
    with pytest.raises(InvalidInputError, match=r"silent\.mp4 has no audio stream"):
        VideoWriter(out, W, H, Fraction(25), audio_path=clips / "silent.mp4")
    assert not out.exists()


def test_writer_rejects_frames_of_the_wrong_shape_or_type(tmp_path: Path) -> None:
    with VideoWriter(tmp_path / "out.mp4", W, H, Fraction(25)) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.write(np.zeros((H + 1, W, 3), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((H, W, 3), np.float32))
        writer.write(np.zeros((H, W, 3), np.uint8))


def test_writer_without_frames_fails_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(MediaProcessingError, match=r"no frames were written to out\.mp4"):
        with VideoWriter(tmp_path / "out.mp4", W, H, Fraction(25)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_writer_timeout_kills_ffmpeg_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(MediaProcessingError, match="timed out"):
        with VideoWriter(tmp_path / "out.mp4", W, H, Fraction(25), timeout_s=0.3) as writer:
            writer.write(smooth_frames(2))
            time.sleep(0.6)
            writer.write(smooth_frames(2))
    assert list(tmp_path.iterdir()) == []


def test_writer_only_writes_the_containers_it_has_codecs_for(tmp_path: Path) -> None:
    # H.264 in MP4/MOV/MKV, VP9 in WebM (tests/test_outputs.py); nothing else
    with pytest.raises(ValueError, match="unsupported output container"):
        VideoWriter(tmp_path / "out.avi", W, H, Fraction(25))


# --------------------------------------------------------------------------- files that lie
# Each file is built here from a real one by editing bytes (tests/hostile_media.py). The
# limits are the hostile-input server's: 20 s of video or audio, 120 fps.

LIMITS = MediaLimits(max_video_seconds=20, max_audio_seconds=20, max_video_pixels=1920 * 1080, max_fps=120)


def ffmpeg_reads(path: Path) -> str:
    """What ffmpeg with no whitelist makes of a file: its input summary (to show a lie is real)."""
    res = subprocess.run([media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                         capture_output=True, text=True, timeout=60)
    return "\n".join(ln for ln in res.stderr.splitlines() if ln.startswith(("Input #", "  Duration")))


@pytest.fixture(scope="module")
def lies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lies")
    ffmpeg("-f", "lavfi", "-i", "sine=f=300:r=8000:d=60", "-c:a", "aac", "-b:a", "12k", "-use_editlist", "0",
           d / "speech60.m4a")  # fmt: skip
    mp4_with_sample_durations(d / "speech60.m4a", d / "understated.m4a", delta=8)  # 1024 -> 8: declares 0.47 s
    mp4_with_sample_durations(d / "speech60.m4a", d / "overstated.m4a", factor=1000)  # declares 16.7 hours
    ffmpeg(*lavfi_video(4, size="64x64"), "-c:v", "libx264", "-preset", "ultrafast", "-use_editlist", "0",
           d / "clip4.mp4")  # fmt: skip
    mp4_with_sample_durations(d / "clip4.mp4", d / "squeezed.mp4", delta=1)  # 120 frames in 7.8 ms
    mp4_with_sample_durations(d / "clip4.mp4", d / "stretched.mp4", factor=1000)  # 120 frames over 4000 s
    mp4_with_sample_durations(d / "clip4.mp4", d / "zero.mp4", delta=0)  # every frame at t = 0
    ffmpeg("-f", "lavfi", "-i", "sine=d=10:r=16000", "-c:a", "pcm_s16le", d / "ten.wav")
    ffmpeg(*lavfi_video(2, size="64x64"), *sine(2), "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
           d / "real.mp4")  # fmt: skip
    return d


@pytest.mark.parametrize("name, target", [("speech.wav", "ten.wav"), ("video.mp4", "real.mp4")])
def test_a_concat_playlist_is_refused_whatever_its_name(lies: Path, tmp_path: Path, name: str, target: str) -> None:
    (tmp_path / target).write_bytes((lies / target).read_bytes())
    playlist = ffconcat(tmp_path / name, tmp_path / target, repeat=1000)  # 40 KB of text -> hours of media
    assert "Input #0, concat" in ffmpeg_reads(playlist)  # without the whitelist, ffmpeg plays it
    for probe in (probe_audio, probe_video):
        with pytest.raises(InvalidInputError, match=rf"{name} is not a supported (audio|video) file: .*'concat'"):
            probe(playlist)
    with pytest.raises(InvalidInputError, match="'concat'"):
        decode_audio(playlist)


@pytest.mark.parametrize("name", ["speech.mp3", "speech.m3u8"])
def test_an_hls_playlist_is_refused(lies: Path, tmp_path: Path, name: str) -> None:
    (tmp_path / "seg.mp4").write_bytes((lies / "real.mp4").read_bytes())
    playlist = hls_playlist(tmp_path / name, tmp_path / "seg.mp4", repeat=1000)
    if name.endswith(".m3u8"):  # ffmpeg detects HLS by content only under an HLS name
        assert "Input #0, hls" in ffmpeg_reads(playlist) and "Duration: 02:46:40" in ffmpeg_reads(playlist)
    with pytest.raises(InvalidInputError, match=rf"{name} is not a (readable|supported) audio file"):
        probe_audio(playlist)
    with pytest.raises(InvalidInputError, match=rf"{name} is not a (readable |supported )?video file"):
        probe_video(playlist)


def test_a_video_swapped_for_a_playlist_after_probing_is_not_played(lies: Path, tmp_path: Path) -> None:
    path = tmp_path / "input.mp4"
    path.write_bytes((lies / "real.mp4").read_bytes())
    info = probe_video(path)
    (tmp_path / "real.mp4").write_bytes(path.read_bytes())
    ffconcat(path, tmp_path / "real.mp4", repeat=1000)  # later calls name the probed demuxer: -f mov
    with pytest.raises(MediaProcessingError, match="decoding input.mp4"):
        with VideoReader(path, info) as reader:
            list(reader)


def test_audio_whose_packets_understate_it_stops_decoding_at_the_limit(lies: Path) -> None:
    path = lies / "understated.m4a"
    info = probe_audio(path)
    assert info.duration < 1  # what the file declares ...
    assert len(decode_audio(path)) == pytest.approx(60 * 16000, rel=0.01)  # ... and what it holds
    tracemalloc.start()
    try:
        with pytest.raises(InputTooLargeError, match=r"understated\.m4a: .* more than the limit of 5 s") as exc:
            decode_audio(path, max_seconds=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.value.http_status == 413
    limit_bytes = (5 + media.AUDIO_LIMIT_SLACK_S) * 16000 * 4
    assert peak < 1.3 * limit_bytes + 2 * 2**20  # the limit's worth of samples, not the 3.8 MB it decodes to


def test_audio_whose_packets_overstate_it_is_over_the_limit_at_the_probe(lies: Path) -> None:
    info = probe_audio(lies / "overstated.m4a")
    assert info.duration > 3600
    with pytest.raises(InputTooLargeError, match=r"overstated\.m4a: \d+\.\d s of audio is over the limit of 20 s"):
        LIMITS.check_audio(info, "overstated.m4a")


def test_video_frames_squeezed_into_milliseconds_are_over_the_frame_rate_limit(lies: Path) -> None:
    info = probe_video(lies / "squeezed.mp4")  # no usable rate in the header: count / duration
    assert info.fps > 10_000 and info.packet_count == 120
    with pytest.raises(InputTooLargeError, match=r"frame rate of \d+ fps is above the limit of 120 fps"):
        LIMITS.check_video(info, "squeezed.mp4")


def test_video_frames_stretched_over_hours_are_over_the_duration_limit(lies: Path) -> None:
    info = probe_video(lies / "stretched.mp4")
    assert info.duration == pytest.approx(4000, abs=0.1) and info.packet_count == 120
    with pytest.raises(InputTooLargeError, match=r"4000\.0 s of video is over the limit of 20 s"):
        LIMITS.check_video(info, "stretched.mp4")


def test_decoding_stops_at_the_frame_limit_when_timestamps_disagree_with_the_probe(lies: Path, tmp_path: Path) -> None:
    """The probe said 4 s at 30 fps; the file decoded is the stretched one (swapped after probing):
    constant-rate output would repeat its 120 pictures as 120,000 frames."""
    path = tmp_path / "input.mp4"
    path.write_bytes((lies / "clip4.mp4").read_bytes())
    info = probe_video(path)
    path.write_bytes((lies / "stretched.mp4").read_bytes())
    limit = MediaLimits(max_video_seconds=4).max_frames(info.fps)
    with VideoReader(path, info, max_frames=limit) as reader:
        with pytest.raises(InputTooLargeError, match=r"input\.mp4: it decodes to more than 121 frames"):
            while reader.read_chunk(16).shape[0]:
                pass
        assert reader.frames_read <= limit + 16
    assert reader._ff.proc.poll() is not None  # ffmpeg was stopped, not left running


def test_a_video_with_every_frame_at_time_zero_gets_a_bounded_rate(lies: Path) -> None:
    info = probe_video(lies / "zero.mp4")
    assert 0 < info.fps <= 120 and info.duration > 0
    with VideoReader(lies / "zero.mp4", info, max_frames=LIMITS.max_frames(info.fps)) as reader:
        assert 0 < len(list(reader)) <= info.frame_count_estimate + 2


def test_an_absurd_declared_frame_rate_is_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "fast.mp4"
    ffmpeg(*lavfi_video(0.2, rate="1000", size="64x64"), "-c:v", "libx264", "-preset", "ultrafast", path)
    info = probe_video(path)
    assert info.fps == 1000
    with pytest.raises(InputTooLargeError, match="1000 fps is above the limit of 120 fps"):
        LIMITS.check_video(info, path.name)


def test_a_burst_of_frames_in_a_variable_rate_file_is_over_the_frame_count_limit(tmp_path: Path) -> None:
    """3000 frames in the first second, then 25 fps: the header's rate is a plausible 50."""
    path = tmp_path / "burst.mp4"
    ffmpeg(*lavfi_video(128, size="32x32"), "-vf", "setpts='if(lt(N,3000),N/3000,1+(N-3000)/25)/TB'",
           "-frames:v", "3200", "-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "ultrafast",
           "-video_track_timescale", "30000", path)  # fmt: skip
    info = probe_video(path)
    assert info.duration < 20 and info.fps <= 120  # within the duration and rate limits ...
    assert info.packet_count == 3200  # ... but not the real frame count (20 s x 120 fps = 2400)
    with pytest.raises(InputTooLargeError, match=r"holds 3,200 frames, over the limit of 2,400"):
        LIMITS.check_video(info, path.name)


@pytest.mark.parametrize("edit, expected", [
    ({"data_size": 0xFFFFFFF0}, 10.0),  # claims 74 hours of data: the packets end where the file does
    ({"data_size": 3200}, 0.1),  # claims 0.1 s: decoding stops there too
    ({"sample_rate": 8000}, 20.0),  # half the rate: twice as long, and it decodes to twice as long
    ({"sample_rate": 1}, "400"),  # 1 Hz: 160,000 s that resample to days of samples
    ({"sample_rate": 2**30}, "400"),  # 1 GHz: the resampler would spin for minutes for nothing
    ({"sample_rate": 0}, "400"),
], ids=["huge-data-size", "small-data-size", "half-rate", "1-hz", "1-ghz", "0-hz"])
def test_a_wav_header_that_lies_is_what_it_decodes_to_or_refused(lies: Path, tmp_path: Path, edit,
                                                                 expected) -> None:
    path = wav_with_header(lies / "ten.wav", tmp_path / "speech.wav", **edit)
    if expected == "400":
        with pytest.raises(InvalidInputError, match=r"speech\.wav is not a readable audio file"):
            probe_audio(path)
        return
    info = probe_audio(path)
    assert info.duration == pytest.approx(expected, abs=0.01)
    samples = decode_audio(path, max_seconds=LIMITS.max_audio_seconds, info=info)
    assert len(samples) / 16000 == pytest.approx(expected, abs=0.05)  # the probe agrees with what decodes


def test_a_header_of_millions_of_metadata_lines_is_refused_in_bounded_memory_and_time(tmp_path: Path) -> None:
    import psutil

    ffmpeg(*lavfi_video(1, size="64x64"), "-c:v", "libx264", "-preset", "ultrafast", tmp_path / "clip.mkv")
    path = mkv_with_huge_metadata(tmp_path / "clip.mkv", tmp_path / "input.mkv", lines=1_000_000)
    assert path.stat().st_size < 5 * 2**20  # 1 MB that ffmpeg prints as 2 x 22 MB of summary
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInputError, match=r"input\.mkv is not a readable video file: its header is too"):
            probe_video(path, timeout_s=30)  # a timeout would be a 500, not this
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20  # the old probe kept all of it: 619 MB and 51 s for a 2M-line file
    assert psutil.Process().memory_info().rss - rss_before < 64 * 2**20


def test_a_probe_shares_one_deadline_between_its_steps(clips: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 0.0, 100.0, 100.0, 100.0])  # the summary step returns after 100 s of a 60 s budget
    monkeypatch.setattr(media.time, "monotonic", lambda: next(clock, 100.0))
    with pytest.raises(MediaProcessingError, match=r"ffmpeg timed out after 60 s while probing clip\.mp4"):
        probe_video(clips / "clip.mp4", timeout_s=60)
