"""The timed runner (models/timed.py): MuseTalk's calls, arrays of the right shapes, an H100's time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lipsync_runner.audio import windows as audio
from lipsync_runner.config import RunnerSettings
from lipsync_runner.models.timed import GREY, LatencyModel, TimedMuseTalk
from lipsync_runner.serving.packing import pack_generate, unpack_generate
from lipsync_runner.serving.runner import RunnerCore


class Sleeps(list):
    """A sleep that records what it was asked for and returns at once."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_calls_return_musetalks_shapes_and_dtypes():
    model = TimedMuseTalk(sleep=Sleeps())
    crops = np.zeros((5, 256, 256, 3), np.uint8)
    latents = model.prepare(crops)
    assert latents.shape == (5, 8, 32, 32) and latents.dtype == np.float32
    faces = model.generate(latents, np.zeros((5, model.tokens_per_frame, 384), np.float32))
    assert faces.shape == (5, 256, 256, 3) and faces.dtype == np.uint8 and (faces == GREY).all()
    pcm = np.zeros(int(2.5 * audio.SAMPLE_RATE), np.float32)
    states = model.audio_features(pcm)
    assert states.shape == (audio.step_count(len(pcm)), 5, 384) and states.dtype == np.float32
    assert model.tokens_per_frame == 50


def test_bad_shapes_are_refused():
    model = TimedMuseTalk(sleep=Sleeps())
    with pytest.raises(ValueError, match="crops"):
        model.prepare(np.zeros((2, 128, 128, 3), np.uint8))
    with pytest.raises(ValueError, match="latents"):
        model.generate(np.zeros((2, 8, 32, 32), np.float32), np.zeros((3, 50, 384), np.float32))


def test_latency_model_arithmetic():
    m = LatencyModel()
    # generate: UNet + VAE decode, 0.800 TFLOP per frame at half of 790 TFLOP/s ...
    compute = 0.800e12 / (790e12 * 0.5)
    pcie = ((8 * 32 * 32 + 50 * 384) * 4 + 256 * 256 * 3) / 25e9  # latents + window in, a face out
    # ... plus, once per call, the launches and the fp16 weights read at 3 TB/s
    fixed = 1e-3 + (1.72 + 0.099) * 1e9 / 3e12
    assert m.generate_s(32) == pytest.approx(fixed + 32 * (compute + pcie))
    assert m.generate_s(32) - m.generate_s(16) == pytest.approx(16 * (compute + pcie))
    # prepare: the two VAE encodes, 0.545 TFLOP per frame, the encoder's weights once per call
    per_crop = 0.545e12 / (790e12 * 0.5) + (256 * 256 * 3 + 8 * 32 * 32 * 4) / 25e9
    assert m.prepare_s(8) == pytest.approx(1e-3 + 0.068e9 / 3e12 + 8 * per_crop)
    # about 2 ms per generated frame at batch 32: the realistic GPU cost
    assert 1.9e-3 < m.generate_s(32) / 32 < 2.2e-3
    assert m.frames_per_second(32, cold=False) == pytest.approx(32 / m.generate_s(32))
    assert m.frames_per_second(32, cold=True) == pytest.approx(32 / (m.generate_s(32) + m.prepare_s(32)))
    # batching amortises the fixed cost; efficiency scales the compute
    assert m.frames_per_second(64, cold=False) > m.frames_per_second(8, cold=False)
    assert LatencyModel(efficiency=0.25).generate_s(32) > 1.9 * m.generate_s(32) - 2 * fixed


def test_each_call_sleeps_the_modelled_time():
    sleeps = Sleeps()
    latency = LatencyModel(efficiency=0.4)
    model = TimedMuseTalk(latency, sleep=sleeps)
    model.prepare(np.zeros((8, 256, 256, 3), np.uint8))
    model.generate(np.zeros((16, 8, 32, 32), np.float32), np.zeros((16, 50, 384), np.float32))
    model.encode_pieces(np.zeros((1, 480_000), np.float32))
    assert sleeps == pytest.approx([latency.prepare_s(8), latency.generate_s(16), latency.audio_pieces_s(1)])
    assert model.busy_s == pytest.approx(sum(sleeps))


def test_one_call_on_the_gpu_at_a_time():
    active, most = 0, 0
    guard = threading.Lock()

    def sleep(seconds: float) -> None:
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        time.sleep(0.01)  # room for another thread to enter, if the model let it
        with guard:
            active -= 1

    model = TimedMuseTalk(sleep=sleep)
    crops = np.zeros((2, 256, 256, 3), np.uint8)
    threads = [threading.Thread(target=model.prepare, args=(crops,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_the_runner_serves_the_timed_model_when_the_setting_says_so(monkeypatch):
    monkeypatch.setenv("LIP_SYNC_RUNNER_MODEL", "timed")
    monkeypatch.setenv("LIP_SYNC_TIMED_EFFICIENCY", "0.6")
    core = RunnerCore(RunnerSettings())  # no models directory: nothing is loaded
    deadline = time.monotonic() + 10
    while not core.ready and time.monotonic() < deadline:
        time.sleep(0.01)
    health = core.health()
    assert health["models_loaded"] and health["device"] == "timed-h100" and health["tokens_per_frame"] == 50
    assert health["weights_id"] == "timed-h100:790x0.6"
    latents = core.prepare(np.zeros((3, 256, 256, 3), np.uint8))
    packed = pack_generate(latents, np.zeros((3, 50, 384), np.float32), tag=7.0)
    assert unpack_generate(packed, 384)[1].shape == (3, 8, 32, 32)
    faces = core.generate(packed)
    assert faces.shape == (3, 256, 256, 3) and faces.dtype == np.uint8
    assert core.stats.as_dict()["rows"] == {"prepare": 3, "generate": 3}


def test_the_timed_runner_needs_no_weights(monkeypatch):
    from lipsync_runner.config import Settings

    monkeypatch.delenv("MUSETALK_MODELS_DIR", raising=False)
    monkeypatch.delenv("LIP_SYNC_MODELS_DIR", raising=False)
    assert Settings().models_from_store  # the real models: from the BentoML store when no directory is set
    monkeypatch.setenv("LIP_SYNC_RUNNER_MODEL", "timed")
    assert not Settings().models_from_store  # service.py asks the store for nothing


def test_a_job_runs_end_to_end_against_it(tmp_path):
    """Everything around the model runs for real: the grey faces are blended into the output."""
    from lipsync_runner.faces import HaarFaceDetector
    from lipsync_runner.media.ffmpeg import VideoReader
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio
    from lipsync_runner.pipeline.job import PipelineOptions, run

    video = write_face_video(tmp_path / "face.mp4", seconds=1.0, size=(320, 240))
    speech = write_speech_like_audio(tmp_path / "speech.wav", seconds=1.0)
    sleeps = Sleeps()
    model = TimedMuseTalk(sleep=sleeps)
    result = run(model, HaarFaceDetector(), video, speech, tmp_path / "out.mp4", PipelineOptions(batch_size=8))
    assert result.frames == 25 and result.generated == result.face_frames > 0
    assert len(sleeps) >= 1 + 2 * -(-result.generated // 8)  # audio, then prepare and generate per chunk
    with VideoReader(tmp_path / "out.mp4") as reader:
        out = reader.read_chunk(25)
    with VideoReader(video) as reader:
        source = reader.read_chunk(25)
    assert np.abs(out.astype(int) - source.astype(int)).mean() > 1  # the mouths were replaced
