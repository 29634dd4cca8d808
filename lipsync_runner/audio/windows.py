"""Audio conditioning exactly as MuseTalk builds it, minus its integer-fps bug.

Whisper runs at 50 feature steps per second; each video frame i is conditioned on
10 consecutive steps starting at floor(i * 50 / fps) of a zero-padded step sequence,
each step carrying the encoder's hidden states (embeddings + every layer), flattened
time-major into 50 tokens of 384 and offset by a sinusoidal positional encoding.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16_000
STEPS_PER_SECOND = 50  # Whisper: 10 ms hop, stride-2 conv
PIECE_SECONDS = 30  # Whisper's fixed input window
PADDING_LEFT = 2  # MuseTalk's audio_padding_length_left/right
PADDING_RIGHT = 2
WINDOW_STEPS = 2 * (PADDING_LEFT + PADDING_RIGHT + 1)  # 10 steps per frame


def frame_count(n_samples: int, fps: Fraction | float) -> int:
    """Number of output frames for an audio track: floor(seconds * fps), computed exactly."""
    fps = Fraction(fps)
    return (n_samples * fps.numerator) // (SAMPLE_RATE * fps.denominator)


def step_count(n_samples: int) -> int:
    """Whisper steps that carry real audio: floor(seconds * 50)."""
    return (n_samples * STEPS_PER_SECOND) // SAMPLE_RATE


def pad_pieces(pcm: np.ndarray) -> np.ndarray:
    """[P, 480000] float32: the 30 s pieces, the last one zero-padded (a batchable array)."""
    size = PIECE_SECONDS * SAMPLE_RATE
    n = max(1, -(-len(pcm) // size))
    out = np.zeros((n, size), dtype=np.float32)
    out.reshape(-1)[: len(pcm)] = pcm
    return out


def _padding_steps(fps: Fraction) -> tuple[int, int]:
    # MuseTalk pads ceil(50/fps) steps per padding unit, 3x on the right as a bounds guard.
    unit = math.ceil(Fraction(STEPS_PER_SECOND) / fps)
    return unit * PADDING_LEFT, unit * 3 * PADDING_RIGHT


def window_starts(frame_indices: np.ndarray, fps: Fraction | float) -> np.ndarray:
    """Start of each frame's window in the padded step sequence: floor(i * 50 / fps)."""
    fps = Fraction(fps)
    idx = np.asarray(frame_indices, dtype=np.int64)
    return (idx * STEPS_PER_SECOND * fps.denominator) // fps.numerator


def frame_windows(steps: np.ndarray, frame_indices: np.ndarray, fps: Fraction | float,
                  first_step: int = 0) -> np.ndarray:
    """Audio windows for the given output frames.

    steps: [S, L, D] encoder hidden states (L = layers + 1, D = 384), real audio only; ``first_step``:
    the step of the audio that steps[0] is (a live session encodes only its recent audio).
    Returns [len(frame_indices), WINDOW_STEPS * L, D] float32, time-major (token = t * L + layer),
    without positional encoding (the model adds it, as MuseTalk's script does before the UNet).
    """
    fps = Fraction(fps)
    left, right = _padding_steps(fps)
    n_steps, layers, dim = steps.shape
    starts = window_starts(frame_indices, fps) - first_step
    # Index the padded sequence without materialising it: padded[k] = steps[k - left] or 0.
    if starts.size and starts.max() > n_steps + left:
        raise ValueError("frame index beyond the end of the audio")
    # Steps past the padded end read as zeros too: above 50 fps MuseTalk's right padding is
    # too short for the last frames (its script crashes there); zero is what padding means.
    positions = starts[:, None] + np.arange(WINDOW_STEPS)[None, :] - left
    valid = (positions >= 0) & (positions < n_steps)
    out = np.zeros((len(starts), WINDOW_STEPS, layers, dim), dtype=np.float32)
    out[valid] = steps[positions[valid]]
    return out.reshape(len(starts), WINDOW_STEPS * layers, dim)


@lru_cache(maxsize=8)
def positional_encoding(length: int, d_model: int = 384) -> np.ndarray:
    """Standard sinusoidal encoding [length, d_model]: sin on even, cos on odd channels.

    Computed with torch float32 ops in MuseTalk's order so the values match bit for bit.
    """
    import torch

    position = torch.arange(0, length, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
    pe = torch.zeros(length, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    out = pe.numpy()
    out.setflags(write=False)
    return out
