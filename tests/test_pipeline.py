"""End to end: a real-face video plus speech in, a lip-synced MP4 out (tiny random-weight models)."""

from __future__ import annotations

import os

import subprocess
import sys
import threading
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from lipsync_runner.pipeline.avatar_cache import AvatarCache
from lipsync_runner.errors import JobCancelledError, NoFaceError
from lipsync_runner.faces import HaarFaceDetector, track_faces
from lipsync_runner.pipeline.framestore import FrameSource, FrameStore, pingpong_indices
from lipsync_runner.media.ffmpeg import VideoReader, probe_audio, probe_video
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.job import PipelineOptions, run
from lipsync_runner.pipeline.plan import scratch_bytes
from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

from .plan_media import (FlatModel, frame_indices, magenta_share, pipeline_track, recorded,  # noqa: F401
                         write_indexed_video)

NTSC = Fraction(30000, 1001)


def cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lipsync_runner", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def read_all(path: Path) -> np.ndarray:
    with VideoReader(path) as reader:
        return np.stack(list(reader))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def mouth_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The lower half of the crop box: the only place the blend may change."""
    x1, y1, x2, y2 = box
    m = np.zeros(shape, bool)
    m[(y1 + y2) // 2 : y2, x1:x2] = True
    return m


@pytest.fixture(scope="module")
def detector() -> HaarFaceDetector:
    return HaarFaceDetector()


# ------------------------------------------------------------------ frame indexing


def test_pingpong_plays_forward_then_backward_like_musetalk():
    assert pingpong_indices(np.arange(10), 3).tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]
    # MuseTalk: frame_list + frame_list[::-1], indexed by i % 2N
    frames = list(range(4))
    cycle = frames + frames[::-1]
    assert pingpong_indices(np.arange(20), 4).tolist() == [cycle[i % 8] for i in range(20)]


def test_frame_store_returns_frames_by_index(tmp_path: Path):
    frames = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    with FrameStore(2, 3, tmp_path) as store:
        store.append(frames[:2])
        store.append(frames[2:])
        np.testing.assert_array_equal(store.take(np.array([4, 0, 4])), frames[[4, 0, 4]])
        # runs of consecutive frames (read in one call), a backward run, repeats
        for idx in ([0, 1, 2, 3, 4], [1, 2, 3, 0, 1, 4, 3, 2, 2]):
            np.testing.assert_array_equal(store.take(np.array(idx)), frames[idx])
        with pytest.raises(IndexError):
            store.take(np.array([3, 4, 5]))
        os.truncate(store._file.name, 4 * frames[0].nbytes)  # the disk lost the last frame
        with pytest.raises(OSError, match="short read"):
            store.take(np.array([3, 4]))
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_a_frame_source_serves_a_render_after_tracking_from_its_store(tmp_path: Path):
    frames = np.random.default_rng(0).integers(0, 255, (7, 4, 6, 3), dtype=np.uint8)

    class Reader:  # hands out the decoded frames once, in order
        pos = 0

        def read_chunk(self, n: int) -> np.ndarray:
            chunk, Reader.pos = frames[self.pos:self.pos + n].copy(), self.pos + n
            return chunk

        def close(self) -> None:
            pass

    opened = []
    source = FrameSource(lambda: opened.append(1) or Reader(), (4, 6, 3), store=FrameStore(4, 6, tmp_path))
    assert sum(len(c) for c in source.chunks(3)) == 7 and source.complete
    plan = pingpong_indices(np.arange(16), 7)  # forward, backward, forward again
    for start in range(0, 16, 5):
        got = source.take(plan[start:start + 5])
        np.testing.assert_array_equal(got, frames[plan[start:start + 5]])
        got[:] = 0  # the caller's to change: the store keeps the frames
    np.testing.assert_array_equal(source.take(np.arange(7)), frames)
    assert opened == [1]  # decoded once
    source.close()


# ------------------------------------------------------------------ the CLI, end to end


@pytest.mark.parametrize("audio_name, seconds", [("speech_long.wav", 3.3), ("speech_short.wav", 1.2)])
def test_cli_output_follows_the_audio_with_the_inputs_size_and_rate(media_dir, models_dir, tmp_path, audio_name,
                                                                    seconds):
    out = tmp_path / "out.mp4"
    result = cli("generate", "--video", media_dir / "face.mp4", "--audio", media_dir / audio_name,
                 "--output", out, "--models-dir", models_dir, "--device", "cpu", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    info = probe_video(out)
    assert (info.width, info.height, info.fps) == (320, 240, Fraction(25))
    assert abs(info.duration - seconds) <= 1 / 25 + 1e-3
    assert probe_audio(out).codec == "aac"
    assert len(read_all(out)) == int(seconds * 25)


def test_cli_reports_a_video_without_faces_as_bad_input(models_dir, tmp_path):
    video = write_face_video(tmp_path / "empty_room.mp4", seconds=1, blank_frames=tuple(range(25)))
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=1)
    result = cli("generate", "--video", video, "--audio", audio, "--output", tmp_path / "o.mp4",
                 "--models-dir", models_dir)
    assert result.returncode == 2
    assert "no face" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("bad", ["empty", "text", "truncated"])
def test_cli_rejects_corrupt_or_empty_video_with_one_clear_line(media_dir, models_dir, tmp_path, bad):
    video = tmp_path / "in.mp4"
    if bad == "empty":
        video.write_bytes(b"")
    elif bad == "text":
        video.write_text("this is not a video\n" * 100)
    else:
        data = (media_dir / "face.mp4").read_bytes()
        video.write_bytes(data[: len(data) // 3])
    result = cli("generate", "--video", video, "--audio", media_dir / "speech_short.wav", "--output",
                 tmp_path / "o.mp4", "--models-dir", models_dir)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and "in.mp4" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_takes_the_job_parameters_from_the_schema(media_dir, models_dir, tmp_path, capsys):
    from lipsync_runner.cli import main  # in-process: the subprocess tests above cover the process boundary

    out = tmp_path / "out.mp4"
    code = main(["generate", "--video", str(media_dir / "face.mp4"), "--audio", str(media_dir / "speech_long.wav"),
                 "--output", str(out), "--models-dir", str(models_dir), "--device", "cpu", "--no-cache",
                 "--sync-mode", "cut_off", "--silence", "generate", "--segments", '[{"start": 0.5, "end": 1.0}]'])
    assert code == 0, capsys.readouterr().err
    assert len(read_all(out)) == 50  # cut_off: as long as the 2 s video, not the 3.3 s audio
    assert "mouth generated in 12;" in capsys.readouterr().out  # frames 13..24: the segment only
    assert probe_audio(out).duration == pytest.approx(2.0, abs=0.03)


def test_cli_refuses_bad_job_parameters_before_any_work(media_dir, tmp_path, capsys):
    from lipsync_runner.cli import main

    code = main(["generate", "--video", str(media_dir / "face.mp4"), "--audio", str(media_dir / "speech_short.wav"),
                 "--output", str(tmp_path / "o.mp4"), "--models-dir", str(tmp_path / "no-models"),
                 "--sync-mode", "sideways"])
    err = capsys.readouterr().err
    assert code == 2  # not 3: the models were never looked at
    assert err.startswith("error: Invalid parameters: sync_mode: Input should be 'bounce', 'loop', 'cut_off'")
    assert "Traceback" not in err and not (tmp_path / "o.mp4").exists()


def test_cli_rejects_audio_without_sound(media_dir, models_dir, tmp_path):
    text = tmp_path / "speech.mp3"
    text.write_text("not audio")
    result = cli("generate", "--video", media_dir / "face.mp4", "--audio", text, "--output", tmp_path / "o.mp4",
                 "--models-dir", models_dir)
    assert result.returncode == 2 and "speech.mp3" in result.stderr and "Traceback" not in result.stderr


def test_cli_without_models_says_where_to_get_them(media_dir, tmp_path):
    result = cli("generate", "--video", media_dir / "face.mp4", "--audio", media_dir / "speech_short.wav",
                 "--output", tmp_path / "o.mp4", "--models-dir", tmp_path / "missing")
    assert result.returncode == 3 and "models directory not found" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ what changes in the picture


def test_only_the_mouth_region_is_regenerated(model, detector, media_dir, tmp_path):
    out = run(model, detector, media_dir / "face.mp4", media_dir / "speech_long.wav", tmp_path / "o.mp4",
              PipelineOptions(params=JobParams(silence="generate"), batch_size=16))  # pauses too (frames 30, 81)
    src = read_all(media_dir / "face.mp4")
    got = read_all(out.output)
    assert len(got) == out.frames == 82 and out.source_frames == 50 and out.face_frames == 50
    with VideoReader(media_dir / "face.mp4") as reader:
        track = track_faces(_chunks(reader), detector)
    for i in (0, 30, 49, 50, 60, 81):  # forward, the turn, and backward (ping-pong) frames
        j = pingpong_indices(np.array([i]), 50)[0]
        mouth = mouth_mask(src.shape[1:3], track.boxes[j])
        assert psnr(got[i][~mouth], src[j][~mouth]) > 38, f"frame {i}: outside the mouth changed"
        assert np.abs(got[i][mouth].astype(int) - src[j][mouth].astype(int)).mean() > 10, f"frame {i}: mouth kept"


def _chunks(reader: VideoReader, size: int = 16):
    while len(chunk := reader.read_chunk(size)):
        yield chunk


def test_frames_without_a_face_pass_through_unchanged_and_in_place(model, detector, tmp_path):
    blank = tuple(range(10, 16))
    video = write_face_video(tmp_path / "v.mp4", seconds=1.2, blank_frames=blank)
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=1.2)
    out = run(model, detector, video, audio, tmp_path / "o.mp4", PipelineOptions(batch_size=8))
    src, got = read_all(video), read_all(out.output)
    assert len(got) == len(src) == 30 and out.face_frames == 30 - len(blank)
    for i in blank:
        assert psnr(got[i], src[i]) > 40  # untouched (only the re-encode differs)
    for i in (5, 20):
        assert psnr(got[i], src[i]) < psnr(got[12], src[12])  # faces were regenerated


def test_ntsc_rate_is_kept_exactly_and_does_not_drift(model, detector, tmp_path):
    video = write_face_video(tmp_path / "ntsc.mp4", seconds=1.5, fps=NTSC)
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=4.0)
    out = run(model, detector, video, audio, tmp_path / "o.mp4", PipelineOptions(batch_size=16))
    info = probe_video(out.output)
    assert info.fps == NTSC
    assert out.frames == (4 * 30000) // 1001 == 119  # MuseTalk's int(fps) would give 116
    assert abs(info.duration - 119 * 1001 / 30000) < 1 / 29.97


def test_audio_can_come_from_a_videos_sound_track(model, detector, media_dir, tmp_path):
    dubbed = write_face_video(tmp_path / "dub.mkv", seconds=1.0, with_audio=True)
    out = run(model, detector, media_dir / "face.mp4", dubbed, tmp_path / "o.mp4")
    assert out.frames == 25 and probe_audio(out.output).duration == pytest.approx(1.0, abs=0.05)


def test_batch_size_does_not_change_the_result(model, detector, media_dir, tmp_path):
    a = run(model, detector, media_dir / "face.mp4", media_dir / "speech_short.wav", tmp_path / "a.mp4",
            PipelineOptions(batch_size=4))
    b = run(model, detector, media_dir / "face.mp4", media_dir / "speech_short.wav", tmp_path / "b.mp4",
            PipelineOptions(batch_size=13))
    assert psnr(read_all(a.output), read_all(b.output)) > 45


def test_a_cancelled_job_stops_and_leaves_no_output(model, detector, media_dir, tmp_path):
    calls = []
    with pytest.raises(JobCancelledError):
        run(model, detector, media_dir / "face.mp4", media_dir / "speech_long.wav", tmp_path / "o.mp4",
            should_cancel=lambda: calls.append(1) or len(calls) > 3)
    assert list(tmp_path.iterdir()) == []


def test_a_detector_failing_mid_video_leaves_no_decode_or_spool_thread_behind(model, detector, tmp_path):
    video = write_face_video(tmp_path / "v.mp4", seconds=4, size=(160, 120))  # 100 frames: 4 tracking chunks
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=4)

    class FailsOnTheSecondChunk:
        name = detector.name
        calls = 0

        def detect(self, frames):
            self.calls += 1
            if self.calls == 2:  # a read-ahead and a store write are in flight now
                raise RuntimeError("detector crashed")
            return detector.detect(frames)

    with pytest.raises(RuntimeError, match="detector crashed"):
        run(model, FailsOnTheSecondChunk(), video, audio, tmp_path / "o.mp4")
    assert [t.name for t in threading.enumerate() if t.name.startswith("lipsync-decode")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "v.mp4"]  # the store file is gone


def test_how_often_faces_are_detected_is_a_deployment_setting(model, detector, tmp_path, monkeypatch):
    from lipsync_runner.config import RunnerSettings

    video = write_face_video(tmp_path / "v.mp4", seconds=1, size=(160, 120))  # 25 frames
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=1)

    class Counting:
        name = detector.name
        frames = 0

        def detect(self, frames):
            self.frames += len(frames)
            return detector.detect(frames)

    cache = AvatarCache(tmp_path / "avatars")
    assert PipelineOptions.from_settings(RunnerSettings()).detect_every == 2  # the default
    seen = []
    for every in ("3", "2"):
        monkeypatch.setenv("LIP_SYNC_DETECT_EVERY", every)
        counting = Counting()
        result = run(model, counting, video, audio, tmp_path / f"o{every}.mp4",
                     PipelineOptions.from_settings(RunnerSettings()), cache=cache)
        seen.append((counting.frames, result.cache_hit))
    # frames 0, k, 2k, ... and the last one (24); the track made with k=3 is not reused for k=2
    assert seen == [(9, False), (13, False)]


def test_progress_is_reported_monotonically_up_to_one(model, detector, media_dir, tmp_path):
    seen: list[tuple[str, float]] = []
    run(model, detector, media_dir / "face.mp4", media_dir / "speech_short.wav", tmp_path / "o.mp4",
        progress=lambda stage, f: seen.append((stage, f)))
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {"audio", "faces", "generate", "done"} <= {s for s, _ in seen}


def test_no_face_video_raises_no_face_error(model, detector, tmp_path):
    video = write_face_video(tmp_path / "v.mp4", seconds=0.5, blank_frames=tuple(range(12)))
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=0.5)
    with pytest.raises(NoFaceError):
        run(model, detector, video, audio, tmp_path / "o.mp4")


# ------------------------------------------------------------------ sync modes, segments, one decode (issues 12, 16)
# The model here paints every generated mouth flat magenta (plan_media.FlatModel): what is under test is which
# frames the output shows and where it generates, not MuseTalk's numerics (those are the tests above).

N_VIDEO = 40  # 1.6 s at 25 fps


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Videos whose frames carry their index (25 fps and 29.97), a shorter and a longer audio."""
    root = tmp_path_factory.mktemp("indexed")
    return {
        "video": write_indexed_video(root / "v25.mp4", N_VIDEO, 25),
        "ntsc": write_indexed_video(root / "v2997.mp4", 45, NTSC),  # 1.5 s
        "short": write_speech_like_audio(root / "short.wav", seconds=1.0),  # 25 frames at 25 fps, 29 at 29.97
        "long": write_speech_like_audio(root / "long.wav", seconds=2.5),  # 62 frames at 25 fps
    }


def flat_run(video: Path, audio: Path, out: Path, model: FlatModel | None = None, cache=None, **params):
    params.setdefault("silence", "generate")  # every frame with a face is generated unless a test says otherwise
    return run(model or FlatModel(), HaarFaceDetector(), video, audio, out,
               PipelineOptions(params=JobParams(**params), batch_size=16), work_dir=out.parent, cache=cache)


BACK_FROM_END = list(range(N_VIDEO - 1, -1, -1))
SYNC_CASES = [  # mode, audio, frame order of the output, seconds of its sound track
    ("bounce", "long", list(range(N_VIDEO)) + BACK_FROM_END[:22], 2.5),
    ("loop", "long", list(range(N_VIDEO)) + list(range(22)), 2.5),
    ("cut_off", "long", list(range(N_VIDEO)), 1.6),  # the audio past the video is dropped
    ("cut_off", "short", list(range(25)), 1.0),  # bounce and loop do the same here (tests/test_plan.py)
    ("silence", "long", list(range(N_VIDEO)) + BACK_FROM_END[:22], 2.5),
    ("silence", "short", list(range(N_VIDEO)), 1.6),  # the audio is padded to the video's length
    ("remap", "long", [(2 * i + 1) * N_VIDEO // 124 for i in range(62)], 2.5),  # slowed down evenly
    ("remap", "short", [(2 * i + 1) * N_VIDEO // 50 for i in range(25)], 1.0),  # sped up evenly
]


@pytest.mark.parametrize("mode, audio, order, sound_seconds", SYNC_CASES, ids=[f"{c[0]}-{c[1]}" for c in SYNC_CASES])
def test_each_sync_mode_gives_the_exact_length_and_frame_order(indexed, tmp_path, mode, audio, order, sound_seconds):
    result = flat_run(indexed["video"], indexed[audio], tmp_path / "o.mp4", sync_mode=mode)
    got = read_all(result.output)
    assert result.frames == len(got) == len(order)
    assert frame_indices(got) == order
    assert probe_audio(result.output).duration == pytest.approx(sound_seconds, abs=0.03)
    assert list(tmp_path.iterdir()) == [tmp_path / "o.mp4"]  # no scratch left behind


@pytest.mark.parametrize("mode, frames", [("remap", 119), ("silence", 45)])
def test_sync_modes_are_exact_at_2997_fps(indexed, tmp_path, mode, frames):
    audio = write_speech_like_audio(tmp_path / "a.wav", seconds=4.0 if mode == "remap" else 1.0)
    result = flat_run(indexed["ntsc"], audio, tmp_path / "o.mp4", sync_mode=mode)
    got = read_all(result.output)
    info = probe_video(result.output)
    assert info.fps == NTSC and len(got) == frames
    if mode == "remap":  # 45 frames over 119: each shown 2 or 3 times, in order, first and last included
        assert frame_indices(got) == [(2 * i + 1) * 45 // 238 for i in range(119)]
    else:  # 1.0 s of audio is 29 frames; the whole 45-frame video comes back
        assert frame_indices(got) == list(range(45))
        assert probe_audio(result.output).duration == pytest.approx(45 * 1001 / 30000, abs=0.03)


def test_outside_segments_the_frames_are_the_source_frames_byte_for_byte(indexed, tmp_path, recorded):
    segments = [{"start": 0.2, "end": 0.6}, {"start": 1.0, "end": 1.4}]
    result = flat_run(indexed["video"], indexed["long"], tmp_path / "o.mp4", sync_mode="cut_off", segments=segments)
    src = read_all(indexed["video"])
    track = pipeline_track(indexed["video"])
    assert len(recorded) == result.frames == N_VIDEO
    inside = set(range(5, 15)) | set(range(25, 35))
    for i in range(N_VIDEO):
        if i not in inside:
            assert np.array_equal(recorded[i], src[i]), f"frame {i} outside the segments was changed"
    for i in (8, 10, 11, 28, 30, 31):  # away from the cross-fades (3 frames at each edge, inside)
        if track.has_face[i]:
            assert magenta_share(recorded[i], track.boxes[i]) > 0.3, f"frame {i} inside a segment was not re-synced"
    assert 0 < result.generated <= len(inside)


def test_a_cold_job_decodes_the_video_once_and_a_warm_one_streams_it(indexed, tmp_path, monkeypatch):
    import lipsync_runner.pipeline.job as pipeline

    opened: list[Path] = []
    stores: list[int] = []

    class CountingReader(VideoReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(Path(path))
            super().__init__(path, *args, **kwargs)

    class MeasuredStore(FrameStore):
        def close(self) -> None:
            stores.append(len(self) * self._frame_bytes)
            super().close()

    monkeypatch.setattr(pipeline, "VideoReader", CountingReader)
    monkeypatch.setattr(pipeline, "FrameStore", MeasuredStore)
    cache = AvatarCache(tmp_path / "avatars")
    info = probe_video(indexed["video"])

    cold = flat_run(indexed["video"], indexed["short"], tmp_path / "cold.mp4", cache=cache)
    assert (len(opened), cache.builds, cold.cache_hit) == (1, 1, False)  # one decode: tracked, then read back
    assert stores == [scratch_bytes(JobParams(), n_video=N_VIDEO, width=info.width, height=info.height,
                                    fps=info.fps, audio_seconds=1.0, audio_rate=44100, audio_channels=1,
                                    max_spool_bytes=PipelineOptions().max_spool_bytes)]  # what admission reserves

    opened.clear(), stores.clear()
    # other sync mode, silence and segments: the same face track and latents serve (a cache hit)
    warm = flat_run(indexed["video"], indexed["short"], tmp_path / "warm.mp4", cache=cache, sync_mode="cut_off",
                    silence="keep", segments=[{"start": 0.2, "end": 0.8}])
    assert (len(opened), cache.builds, warm.cache_hit, stores) == (1, 1, True, [])  # one straight decode, no store

    opened.clear()
    back = flat_run(indexed["video"], indexed["long"], tmp_path / "back.mp4", cache=cache, sync_mode="bounce")
    assert len(opened) == 1 and back.cache_hit and stores == [N_VIDEO * info.width * info.height * 3]
    assert frame_indices(read_all(back.output)) == SYNC_CASES[0][2]  # forward decoded, backward from the store


def test_a_video_too_large_to_keep_is_decoded_twice_with_the_same_result(indexed, tmp_path, monkeypatch, recorded):
    import lipsync_runner.pipeline.job as pipeline

    opened = []
    monkeypatch.setattr(pipeline, "VideoReader", lambda *a, **k: opened.append(1) or VideoReader(*a, **k))
    kept = flat_run(indexed["video"], indexed["short"], tmp_path / "kept.mp4")
    kept_frames = [f.copy() for f in recorded]
    recorded.clear()
    opts = PipelineOptions(params=JobParams(silence="generate"), batch_size=16, max_spool_bytes=0)
    twice = run(FlatModel(), HaarFaceDetector(), indexed["video"], indexed["short"], tmp_path / "twice.mp4", opts)
    assert len(opened) == 3 and kept.frames == twice.frames == 25
    assert all(np.array_equal(a, b) for a, b in zip(kept_frames, recorded, strict=True))


def test_the_process_that_runs_the_pipeline_sets_opencvs_threads_from_the_settings(tmp_path: Path):
    import cv2

    from lipsync_runner.serving.core import ServiceCore

    from lipsync_runner.config import Settings
    from lipsync_runner.serving.runner import RunnerCore
    from lipsync_runner.config import ServiceSettings
    from lipsync_runner.config import RunnerSettings
    from lipsync_runner.pipeline.job import configure_opencv

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        configure_opencv(RunnerSettings(opencv_threads=0))  # 0: OpenCV's own choice, left alone
        assert cv2.getNumThreads() == 2
        assert RunnerSettings().opencv_threads == 1  # the default
        ServiceCore(RunnerCore(RunnerSettings(device="cpu"), load=False),
                    Settings(service=ServiceSettings(data_dir=tmp_path / "data", avatar_cache=False),
                             runner=RunnerSettings(device="cpu")))
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)
