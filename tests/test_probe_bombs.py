"""Files that cost far more than their size (issue 24, items 5 and 8).

* A 0.6 MB MKV of two 16000x16000 frames: the probe used to decode a frame at full size before
  refusing it (1.5 GB per probe for the issue's file; four at once, one client's upload slots, grew
  the server by 6.9 GB and each answered 500 "ffmpeg timed out ... while probing").
* A 14 KB MKV of two frames 590 s apart: read at 25 fps it is 14,751 frames, and face tracking
  ran over all of them for a 2 s output.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

import lipsync_runner.media.ffmpeg as media
import lipsync_runner.pipeline.job as pipeline
from lipsync_runner.api.errors import error_headers
from lipsync_runner.config import ApiLimits
from lipsync_runner.errors import InputTooLargeError, InvalidInputError, LipSyncError
from lipsync_runner.faces import HaarFaceDetector
from lipsync_runner.inputs.validation import validate_media
from lipsync_runner.errors import ProbeTimeoutError
from lipsync_runner.media.ffmpeg import VideoReader, decode_audio, probe_audio, probe_video
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.job import PipelineOptions, run
from lipsync_runner.pipeline.plan import frames_to_decode

from .hostile_media import ffmpeg, mkv_of_huge_frames, vfr_with_a_gap
from .plan_media import FlatModel

LIMITS = ApiLimits(max_video_pixels=1920 * 1080, max_video_seconds=600, max_audio_seconds=600)
BOMB = "16000x16000"


class ChildMemory:
    """The peak of the summed RSS of this process's ffmpeg children, sampled every 5 ms. (A child
    that has not reached exec yet is this process's copy and shows its RSS: not counted.)"""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for child in me.children(recursive=True):
                try:
                    if child.name().startswith("ffmpeg"):
                        total += child.memory_info().rss
                except psutil.Error:  # gone between the listing and the read
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.005)

    def __enter__(self) -> ChildMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two flat 16000x16000 frames (PNG) and 2 s of sound in Matroska: about 0.6 MB."""
    return mkv_of_huge_frames(tmp_path_factory.mktemp("bomb") / "clip.mkv", 16000, 16000)


# ------------------------------------------------------------------ item 5: frame size


def test_four_probes_of_16000x16000_frames_at_once_are_413_in_seconds_and_bounded_memory(bomb: Path) -> None:
    assert bomb.stat().st_size < 2**20
    rss_before = psutil.Process().memory_info().rss

    def admit(_: int) -> LipSyncError | None:
        try:  # what admission runs on an upload: both files probed and checked
            validate_media(bomb, bomb, LIMITS)
        except LipSyncError as exc:
            return exc
        return None

    start = time.monotonic()
    with ChildMemory() as children, ThreadPoolExecutor(4) as pool:
        refusals = list(pool.map(admit, range(4)))
    elapsed = time.monotonic() - start

    for exc in refusals:
        assert isinstance(exc, InputTooLargeError) and exc.http_status == 413, exc
        assert exc.message == f"clip.mkv: resolution {BOMB} is above the limit of 2,073,600 pixels per frame"
    assert elapsed < 5  # before: about 8 s of decoding per probe, 4 probes on 2 cores
    # Before: each ffmpeg decoded a 256 MB picture (550 MB at its peak), 2.2 GB for the four.
    assert children.peak < 4 * 100 * 2**20, f"ffmpeg children peaked at {children.peak / 2**20:.0f} MB"
    assert psutil.Process().memory_info().rss - rss_before < 64 * 2**20


def test_the_sound_of_a_file_of_huge_frames_is_read_without_decoding_a_picture(bomb: Path) -> None:
    # An "audio" upload is probed and decoded by the same ffmpeg; its pictures are never needed.
    with ChildMemory() as children:
        info = probe_audio(bomb)
        samples = decode_audio(bomb, info=info)
    assert info.duration == pytest.approx(2.0, abs=0.05) and len(samples) == pytest.approx(32000, abs=1600)
    assert children.peak < 150 * 2**20, f"ffmpeg peaked at {children.peak / 2**20:.0f} MB"  # before: 550 MB


def test_a_probe_runs_ffmpeg_under_a_memory_limit(bomb: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The rlimit is the bound of last resort, for a decoder that allocates past ffmpeg's pixel cap:
    # here the cap lets the frames through and only the (lowered) rlimit stands in the way.
    monkeypatch.setattr(media, "PROBE_MEMORY_BYTES", 150 * 2**20)
    monkeypatch.setattr(media, "PROBE_BYTES_PER_PIXEL", 0)
    with ChildMemory() as children, pytest.raises(InvalidInputError, match=r"clip\.mkv is not a readable video"):
        probe_video(bomb, max_pixels=16000 * 16000)
    assert children.peak < 160 * 2**20, f"ffmpeg peaked at {children.peak / 2**20:.0f} MB"  # unbounded: 550 MB


def test_frames_of_allowed_size_still_decode_under_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "uhd.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=3840x2160:rate=25", "-frames:v", "3", "-c:v", "libx264",
           "-preset", "ultrafast", "-pix_fmt", "yuv444p", path)  # 4:4:4: the largest frames x264 makes here
    info = probe_video(path, max_pixels=3840 * 2160)
    assert (info.width, info.height, info.packet_count) == (3840, 2160, 3)
    with VideoReader(path, info, max_pixels=3840 * 2160) as reader:
        assert reader.read_chunk(8).shape == (3, 2160, 3840, 3)
    with pytest.raises(InputTooLargeError, match=r"resolution 3840x2160 is above the limit of 8,294,399 pixels"):
        probe_video(path, max_pixels=3840 * 2160 - 1)


@pytest.mark.parametrize("probe", [probe_video, probe_audio])
def test_a_probe_that_runs_out_of_time_is_503_with_retry_after_not_500(tmp_path: Path, probe) -> None:
    path = write_face_video(tmp_path / "clip.mp4", seconds=0.2, with_audio=True)
    with pytest.raises(ProbeTimeoutError, match=r"ffmpeg timed out after 0\.001 s while probing clip\.mp4") as exc:
        probe(path, timeout_s=0.001)
    assert exc.value.http_status == 503
    assert error_headers(exc.value) == {"Retry-After": "30"}


# ------------------------------------------------------------------ item 8: timestamps far apart


@pytest.fixture(scope="module")
def gap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two face frames 590 s apart, 14 KB: 14,751 frames at the 25 fps ffmpeg reads it at."""
    root = tmp_path_factory.mktemp("gap")
    return vfr_with_a_gap(write_face_video(root / "face.mp4", seconds=0.08), root / "clip.mkv", gap_s=590)


class CountingDetector(HaarFaceDetector):
    def __init__(self) -> None:
        super().__init__()
        self.frames = 0

    def detect(self, frames: np.ndarray):
        self.frames += len(frames)
        return super().detect(frames)


def test_two_frames_590_s_apart_are_tracked_only_as_far_as_a_2_s_output_shows(
        gap: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = probe_video(gap)
    assert (info.frame_count_estimate, info.packet_count) == (14751, 2) and gap.stat().st_size < 50_000
    decoded: list[int] = []

    class CountingReader(VideoReader):
        def close(self) -> None:
            decoded.append(self.frames_read)
            super().close()

    monkeypatch.setattr(pipeline, "VideoReader", CountingReader)
    detector = CountingDetector()
    audio = write_speech_like_audio(tmp_path / "speech.wav", seconds=2.0)
    start = time.monotonic()
    result = run(FlatModel(), detector, gap, audio, tmp_path / "out.mp4",
                 PipelineOptions(params=JobParams(silence="generate")), work_dir=tmp_path)
    assert result.frames == 50 and result.source_frames == 50  # the output, and the frames it shows
    assert sum(decoded) <= 100 and detector.frames <= 100, (decoded, detector.frames)  # before: 14,751
    assert time.monotonic() - start < 30  # before: minutes


def test_remap_of_frames_far_apart_is_refused_before_any_decode(gap: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # remap spreads the output over the whole video: 14,751 frame times for 50 output frames.
    audio = write_speech_like_audio(tmp_path / "speech.wav", seconds=2.0)
    message = r"clip\.mkv holds 2 frames spread over 14,751 frame times .* sync_mode=remap would read all of them"
    with pytest.raises(InputTooLargeError, match=message):  # at admission
        validate_media(gap, audio, LIMITS, params=JobParams(sync_mode="remap"))
    monkeypatch.setattr(pipeline, "VideoReader", None)  # nothing may be decoded
    with pytest.raises(InputTooLargeError, match=message):  # and in the job
        run(FlatModel(), HaarFaceDetector(), gap, audio, tmp_path / "out.mp4",
            PipelineOptions(params=JobParams(sync_mode="remap")), work_dir=tmp_path)


@pytest.mark.parametrize("mode, n_video, n_held, n_audio, expected", [
    # every ordinary video is read whole, whatever the sync mode (its face track is the whole video's)
    *[(mode, 14751, 14751, 50, 14751) for mode in ("bounce", "loop", "cut_off", "silence", "remap")],
    ("bounce", 14751, 14000, 50, 14751),  # variable rate, frames a little apart
    ("bounce", 14751, 0, 50, 14751),  # frames held unknown
    # mostly gaps: the output sets the work
    ("bounce", 14751, 2, 50, 50), ("loop", 14751, 2, 50, 50), ("cut_off", 14751, 2, 50, 50),
    ("silence", 14751, 2, 50, 14751),  # the output is as long as the video
    ("bounce", 100, 2, 250, 100), ("remap", 100, 2, 50, 100),  # the output about as long: all
])
def test_frames_to_decode(mode: str, n_video: int, n_held: int, n_audio: int, expected: int) -> None:
    assert frames_to_decode(mode, n_video=n_video, n_held=n_held, n_audio=n_audio) == expected


def test_a_reader_told_where_to_stop_ends_there_and_stops_ffmpeg(gap: Path) -> None:
    with VideoReader(gap, stop_after=40) as reader:
        assert [len(reader.read_chunk(32)), len(reader.read_chunk(32)), len(reader.read_chunk(32))] == [32, 8, 0]
        assert reader._ff.proc.poll() is not None  # stopped at frame 40, not left blocked on the pipe
