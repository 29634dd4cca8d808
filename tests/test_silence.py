"""Silence keeps the original mouth: speech activity of real speech (espeak-ng) and the frames it leaves alone."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from lipsync_runner.faces import HaarFaceDetector
from lipsync_runner.pipeline.framestore import pingpong_indices
from lipsync_runner.params import JobParams
from lipsync_runner.pipeline.job import PipelineOptions, run
from lipsync_runner.config import RunnerSettings
from lipsync_runner.audio.speech import SpeechSettings, hysteresis, speech_frames

from .plan_media import (FlatModel, Speech, magenta_share, pipeline_track, read_frames, recorded,  # noqa: F401
                         write_indexed_video, write_speech)

FPS = Fraction(25)
FADE = PipelineOptions().fade_frames
PAD_FRAMES = -(-SpeechSettings().pad_ms * 25 // 1000)  # speech is widened by this many frames at most


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Speech:
    """Two short sentences with a one-second pause between them (and a little silence around)."""
    return write_speech(tmp_path_factory.mktemp("speech") / "speech.wav",
                        [0.5, "Hello there.", 1.0, "Good morning to you.", 0.5])


def frames_of(seconds: tuple[float, float], margin: int = 0) -> range:
    """Output frames that start inside [start, end) seconds, `margin` frames in from each side."""
    start, end = (int(np.ceil(t * 25)) for t in seconds)
    return range(start + margin, end - margin)


def pauses(s: Speech) -> list[tuple[float, float]]:
    edges = [0.0] + [t for span in s.spoken for t in span] + [s.seconds]
    return [(edges[k], edges[k + 1]) for k in range(0, len(edges), 2)]


# ------------------------------------------------------------------ speech activity

def test_the_pauses_of_real_speech_are_silence_and_the_sentences_are_speech(speech):
    from lipsync_runner.media.ffmpeg import decode_audio

    flags = speech_frames(decode_audio(speech.path), FPS)
    assert len(flags) == int(speech.seconds * 25)
    for pause in pauses(speech):
        inner = frames_of(pause, margin=PAD_FRAMES + 1)
        assert len(inner) and not flags[list(inner)].any(), f"speech found in the pause {pause}"
    for spoken in speech.spoken:
        inner = list(frames_of(spoken))
        # the gaps between words are shorter than min_silence_ms: one stretch of speech per sentence
        assert flags[inner].all(), f"the sentence at {spoken} is not all speech"


def test_digital_silence_and_quiet_room_tone_are_silence():
    assert not speech_frames(np.zeros(16000, np.float32), FPS).any()
    hum = 10 ** (-60 / 20) * np.sqrt(2) * np.sin(2 * np.pi * 100 * np.arange(32000) / 16000)  # -60 dBFS
    assert not speech_frames(hum.astype(np.float32), FPS).any()
    assert len(speech_frames(np.zeros(1000, np.float32), FPS)) == 1  # 62.5 ms: one frame at 25 fps


def test_hysteresis_fills_short_pauses_drops_short_bursts_and_widens_speech():
    s = SpeechSettings(min_silence_ms=50, min_speech_ms=30, pad_ms=20)  # 5, 3 and 2 frames of 10 ms
    raw = np.zeros(40, bool)
    raw[5:10] = raw[13:18] = True  # a 3-frame pause between two words: filled
    raw[30:32] = True  # a 2-frame click: dropped
    out = hysteresis(raw, s)
    assert np.flatnonzero(out).tolist() == list(range(3, 20))
    raw[20:27] = True  # a pause of 2 after the second word, then speech: no longer a pause
    assert hysteresis(raw, SpeechSettings(min_silence_ms=0, min_speech_ms=0, pad_ms=0)).tolist() == raw.tolist()


def test_the_thresholds_are_deployment_settings(monkeypatch):
    monkeypatch.setenv("LIP_SYNC_MIN_SILENCE_MS", "350")
    monkeypatch.setenv("LIP_SYNC_VAD_AGGRESSIVENESS", "3")
    monkeypatch.setenv("LIP_SYNC_FADE_FRAMES", "5")
    opts = PipelineOptions.from_settings(RunnerSettings(), JobParams(silence="keep"))
    assert (opts.speech.min_silence_ms, opts.speech.aggressiveness, opts.fade_frames) == (350, 3, 5)
    assert "silence" not in RunnerSettings.model_fields and "min_silence_ms" not in JobParams.model_fields


# ------------------------------------------------------------------ the pipeline keeps the source mouth in silence

def test_silent_stretches_show_the_source_frames_exactly(model, media_dir, tmp_path, recorded):
    """Real tiny model, real speech, a 2 s video shorter than the 2.8 s audio (bounce)."""
    speech = write_speech(tmp_path / "speech.wav", [0.5, "Hello.", 0.9, "Good day.", 0.5])  # few frames to generate
    video = media_dir / "face.mp4"
    result = run(model, HaarFaceDetector(), video, speech.path, tmp_path / "o.mp4",
                 PipelineOptions(params=JobParams(silence="keep"), batch_size=16))
    src = read_frames(video)
    out = read_frames(result.output)
    assert len(recorded) == len(out) == result.frames == int(speech.seconds * 25)
    source = pingpong_indices(np.arange(result.frames), len(src))
    quiet = [i for p in pauses(speech) for i in frames_of(p, margin=PAD_FRAMES + FADE + 1)]
    assert len(quiet) >= 10
    for i in quiet:
        assert np.array_equal(recorded[i], src[source[i]]), f"frame {i}, in a pause, is not the source frame"
    talking = [i for s in speech.spoken for i in frames_of(s)]
    assert result.generated >= len(talking)
    mouth_change = [np.abs(recorded[i].astype(int) - src[source[i]]).sum() for i in talking]
    assert min(mouth_change) > 0, "a frame in speech was not generated"
    psnr_quiet = np.mean([_psnr(out[i], src[source[i]]) for i in quiet])
    psnr_talking = np.mean([_psnr(out[i], src[source[i]]) for i in talking])
    assert psnr_quiet > 38 and psnr_quiet > psnr_talking + 3  # and so it is in the encoded file


def test_with_silence_generate_the_pauses_are_generated_too(speech, tmp_path, recorded):
    video = write_indexed_video(tmp_path / "v.mp4", 40, FPS)
    model = FlatModel()
    result = run(model, HaarFaceDetector(), video, speech.path, tmp_path / "o.mp4",
                 PipelineOptions(params=JobParams(silence="generate"), batch_size=16))
    track = pipeline_track(video)
    source = pingpong_indices(np.arange(result.frames), 40)
    assert result.generated == model.generated == int(track.has_face[source].sum())
    quiet = [i for p in pauses(speech) for i in frames_of(p, margin=PAD_FRAMES + FADE + 1)
             if track.has_face[source[i]]]
    assert quiet and all(magenta_share(recorded[i], track.boxes[source[i]]) > 0.3 for i in quiet)


def test_a_longer_video_keeps_its_mouth_in_the_pauses_and_the_padded_tail(speech, tmp_path, recorded):
    n = int(speech.seconds * 25) + 20  # the video outlasts the speech by 0.8 s
    video = write_indexed_video(tmp_path / "v.mp4", n, FPS)
    result = run(FlatModel(), HaarFaceDetector(), video, speech.path, tmp_path / "o.mp4",
                 PipelineOptions(params=JobParams(sync_mode="silence", silence="keep"), batch_size=16))
    src = read_frames(video)
    assert result.frames == len(recorded) == n
    tail = range(int(speech.seconds * 25) + FADE + 1, n)
    quiet = [i for p in pauses(speech) for i in frames_of(p, margin=PAD_FRAMES + FADE + 1)] + list(tail)
    for i in quiet:
        assert np.array_equal(recorded[i], src[i]), f"frame {i} (silence) is not the source frame"
    talking = [i for s in speech.spoken for i in frames_of(s)]
    assert sum(not np.array_equal(recorded[i], src[i]) for i in talking) >= 0.8 * len(talking)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)

