"""Audio conditioning matches MuseTalk's numerics (musetalk/utils/audio_processor.py,
musetalk/models/unet.py), except that fps is a fraction, not truncated to an integer."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lipsync_runner.audio import windows as audio
from lipsync_runner.media.samples import speech_like_signal

NTSC = Fraction(30000, 1001)


def musetalk_reference_windows(steps: np.ndarray, n_samples: int, fps: int) -> np.ndarray:
    """MuseTalk's get_whisper_chunk, restated step by step (integer fps as MuseTalk uses)."""
    feats = torch.from_numpy(steps)[None]  # [1, S, L, D]
    mult = 50 / fps
    num_frames = math.floor((n_samples / 16000) * fps)
    actual = math.floor((n_samples / 16000) * 50)
    feats = feats[:, :actual]
    pad = math.ceil(mult)
    feats = torch.cat([torch.zeros_like(feats[:, : pad * 2]), feats, torch.zeros_like(feats[:, : pad * 3 * 2])], 1)
    clips = [feats[:, math.floor(i * mult): math.floor(i * mult) + 10] for i in range(num_frames)]
    # Above 50 fps the last windows run off the padding (MuseTalk exits there); we read zeros.
    clips = [torch.cat([c, torch.zeros_like(feats[:, : 10 - c.shape[1]])], 1) for c in clips]
    out = torch.cat(clips, 0)  # [T, 10, L, D]
    return out.reshape(out.shape[0], -1, out.shape[-1]).numpy()


def test_output_frame_count_is_floor_of_seconds_times_fps():
    assert audio.frame_count(16000 * 10, 25) == 250
    assert audio.frame_count(16000 * 10 - 1, 25) == 249
    # 29.97 fps: 10 s hold 299.7 frames; MuseTalk's int(fps) would say 290 and drift.
    assert audio.frame_count(16000 * 10, NTSC) == 299
    assert audio.frame_count(16000 * 3600, NTSC) == 107892


def test_whisper_steps_are_fifty_per_second():
    assert audio.step_count(16000) == 50
    assert audio.step_count(16000 * 3 + 319) == 150
    assert audio.step_count(16000 * 3 + 320) == 151


def test_window_start_is_floor_of_frame_times_fifty_over_fps():
    assert audio.window_starts(np.arange(4), 25).tolist() == [0, 2, 4, 6]
    # exact rational arithmetic at 29.97: floor(i * 50 * 1001 / 30000)
    assert audio.window_starts(np.array([0, 1, 2, 3, 599]), NTSC).tolist() == [0, 1, 3, 5, 999]


def test_first_frame_sees_four_zero_steps_then_steps_0_to_5_time_major():
    s, layers, d = 20, 5, 384
    steps = np.zeros((s, layers, d), np.float32)
    steps[:, :, 0] = np.arange(s)[:, None] + 1  # value = step number + 1, any layer
    steps[:, :, 1] = np.arange(layers)[None, :]  # value = layer number
    w = audio.frame_windows(steps, np.array([0, 3]), 25)
    assert w.shape == (2, 50, 384)
    # frame 0: padded steps 0..9 = 4 zero steps, then original steps 0..5
    assert w[0, :, 0].reshape(10, 5)[:, 0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    # token t*5 + layer carries layer `layer` of step t
    assert w[0, 20:25, 1].tolist() == [0, 1, 2, 3, 4]
    # frame 3 at 25 fps: original steps 2*3-4 .. 2*3+5
    assert w[1, ::5, 0].tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]


@pytest.mark.parametrize("fps", [25, 24, 30, 60])
def test_windows_equal_musetalk_reference(fps: int):
    rng = np.random.default_rng(fps)
    n_samples = 16000 * 3 + 1234
    steps = rng.normal(size=(audio.step_count(n_samples), 5, 384)).astype(np.float32)
    expected = musetalk_reference_windows(steps, n_samples, fps)
    got = audio.frame_windows(steps, np.arange(audio.frame_count(n_samples, fps)), fps)
    np.testing.assert_array_equal(got, expected)


def test_last_frame_window_stays_in_bounds_for_ntsc():
    n_samples = 16000 * 7 + 999
    steps = np.ones((audio.step_count(n_samples), 5, 384), np.float32)
    n = audio.frame_count(n_samples, NTSC)
    w = audio.frame_windows(steps, np.arange(n), NTSC)
    assert w.shape == (n, 50, 384)
    with pytest.raises(ValueError):
        audio.frame_windows(steps, np.array([n + 40]), NTSC)


def test_positional_encoding_is_musetalks_sinusoid():
    pe = audio.positional_encoding(50, 384)
    # MuseTalk's PositionalEncoding, restated in torch
    position = torch.arange(0, 50, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, 384, 2).float() * (-math.log(10000.0) / 384))
    ref = torch.zeros(50, 384)
    ref[:, 0::2] = torch.sin(position * div_term)
    ref[:, 1::2] = torch.cos(position * div_term)
    np.testing.assert_array_equal(pe, ref.numpy())
    assert pe[0, :4].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert pe[1, 0] == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pe[1, 1] == pytest.approx(math.cos(1.0), abs=1e-6)


def test_audio_features_stack_every_encoder_state_and_trim_to_real_audio(model):
    pcm = speech_like_signal(3.3)
    steps = model.audio_features(pcm)
    layers = model.whisper_encoder.config.encoder_layers
    assert steps.shape == (165, layers + 1, 384)
    # state 0 is conv + position embedding, the last is the final layer's output after LayerNorm
    mel = model.feature_extractor([pcm], sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.whisper_encoder(mel, output_hidden_states=True)
    np.testing.assert_allclose(steps[:, -1], out.last_hidden_state[0, :165].numpy(), atol=1e-5)
    np.testing.assert_allclose(steps[:, 0], out.hidden_states[0][0, :165].numpy(), atol=1e-5)


def test_audio_longer_than_30s_is_encoded_in_independent_30s_pieces(model):
    pcm = speech_like_signal(31.0)
    steps = model.audio_features(pcm)
    assert steps.shape[0] == 1550
    first_piece = model.audio_features(pcm[: 30 * 16000])
    np.testing.assert_allclose(steps[:1500], first_piece, atol=1e-5)
    # the 1 s tail is its own piece, padded to 30 s by the feature extractor (its clamp sees the padding)
    tail = model.audio_features(pcm[30 * 16000:])
    np.testing.assert_allclose(steps[1500:], tail, atol=1e-5)
