"""Speech activity of the new audio: which video frames fall in silence.

MuseTalk moves the mouth whatever the audio holds, so pauses show a mumbling or hanging
mouth (MuseTalk issues 32, 337). The plan lets silent frames show the source mouth; this
module decides which frames are silent.

Decisions are made on 10 ms frames of the 16 kHz track by WebRTC's voice activity detector
(`webrtcvad-wheels`: a small C extension, no model weights), gated by an energy floor so a
near-silent room tone never counts as speech, then made stable in time by hysteresis:

* a pause shorter than ``min_silence_ms`` between speech stays speech (the gaps between
  syllables and words must not flicker the mouth between source and generated);
* a burst of "speech" shorter than ``min_speech_ms`` is dropped (clicks, lip smacks);
* speech is widened by ``pad_ms`` on both sides: the mouth opens before the sound starts and
  closes after it stops.

A video frame is speech when any 10 ms frame overlapping its time span is speech. The
thresholds are deployment settings (``LIP_SYNC_VAD_*``), not job parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from lipsync_runner.audio.windows import SAMPLE_RATE, frame_count

VAD_FRAME = SAMPLE_RATE // 100  # 10 ms at 16 kHz: one of the three frame sizes webrtcvad accepts


@dataclass(frozen=True)
class SpeechSettings:
    aggressiveness: int = 2  # webrtcvad mode: 0 (lenient) .. 3 (strict about what is speech)
    floor_db: float = -45.0  # 10 ms frames quieter than this (RMS, dB full scale) are silence
    min_silence_ms: int = 200  # shorter pauses count as speech
    min_speech_ms: int = 60  # shorter bursts count as silence
    pad_ms: int = 60  # speech widened by this on both sides

    def __post_init__(self) -> None:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"VAD aggressiveness must be 0..3, got {self.aggressiveness}")


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of True values."""
    m = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def frame_levels_db(pcm: np.ndarray) -> np.ndarray:
    """RMS level of each whole 10 ms frame in dB full scale (a full-scale sine is -3 dB)."""
    n = len(pcm) // VAD_FRAME
    frames = np.asarray(pcm[: n * VAD_FRAME], dtype=np.float64).reshape(n, VAD_FRAME)
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    with np.errstate(divide="ignore"):
        return 20 * np.log10(np.maximum(rms, 1e-10))


def voiced_10ms(pcm: np.ndarray, settings: SpeechSettings = SpeechSettings()) -> np.ndarray:
    """Raw decisions per 10 ms frame (a trailing partial frame is dropped): the VAD and the floor agree."""
    import webrtcvad

    vad = webrtcvad.Vad(settings.aggressiveness)
    loud = frame_levels_db(pcm) >= settings.floor_db
    pcm16 = (np.clip(np.asarray(pcm, np.float32), -1, 1) * 32767).astype("<i2")
    raw = memoryview(pcm16.tobytes())
    step = VAD_FRAME * 2
    out = np.zeros(len(loud), dtype=bool)
    for i in np.flatnonzero(loud):  # the VAD only needs to look at frames above the floor
        out[i] = vad.is_speech(raw[i * step : (i + 1) * step], SAMPLE_RATE)
    return out


def hysteresis(voiced: np.ndarray, settings: SpeechSettings = SpeechSettings()) -> np.ndarray:
    """Raw 10 ms decisions made stable in time (see the module docstring); a new array."""
    out = np.asarray(voiced, bool).copy()
    n = len(out)
    min_gap, min_burst, pad = (max(0, ms // 10) for ms in (settings.min_silence_ms, settings.min_speech_ms,
                                                            settings.pad_ms))
    for a, b in runs(~out):  # short pauses between speech are speech
        if a > 0 and b < n and b - a < min_gap:
            out[a:b] = True
    for a, b in runs(out):  # short bursts are not
        if b - a < min_burst:
            out[a:b] = False
    if pad:
        widened = out.copy()
        for a, b in runs(out):
            widened[max(0, a - pad) : min(n, b + pad)] = True
        out = widened
    return out


def speech_frames(pcm: np.ndarray, fps: Fraction | float, settings: SpeechSettings = SpeechSettings()) -> np.ndarray:
    """[A] bool, one per output frame the audio covers (A = floor(seconds * fps)): True where speech."""
    fps = Fraction(fps)
    n_frames = frame_count(len(pcm), fps)
    flags = hysteresis(voiced_10ms(pcm, settings), settings)
    if n_frames == 0:
        return np.zeros(0, dtype=bool)
    # Video frame a spans samples [a * 16000 / fps, (a + 1) * 16000 / fps): the 10 ms frames that
    # overlap it, exactly (integer arithmetic, so 29.97 fps does not drift).
    a = np.arange(n_frames + 1, dtype=np.int64)
    sample = (a * SAMPLE_RATE * fps.denominator) // fps.numerator
    first = sample[:-1] // VAD_FRAME
    last = -(-sample[1:] // VAD_FRAME)  # exclusive
    counts = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
    first = np.minimum(first, len(flags))
    last = np.minimum(last, len(flags))
    return counts[last] - counts[first] > 0
