"""Test media and doubles for the plan tests: frames that carry their own index, speech with known
pauses from espeak-ng, a model that paints the mouth flat, and an encoder that keeps what it is given."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from lipsync_runner.audio import windows as audio_math
from lipsync_runner.media.ffmpeg import VideoReader, VideoWriter, decode_audio
from lipsync_runner.media.samples import face_frames

# ------------------------------------------------------------------ frames that say which they are

CODE_BITS = 9  # frame indices up to 511
CODE_CELL = 8  # pixels per bit: an 8x8 black or white block in the top rows (the face starts lower)


def write_indexed_video(path: Path, n_frames: int, fps: Fraction | float = 25, size: tuple[int, int] = (160, 120),
                        blank_frames: tuple[int, ...] = ()) -> Path:
    """A real-face clip (lipsync_runner.models.tiny's astronaut) whose frame i shows i in binary, top left."""
    width, height = size
    with VideoWriter(path, width, height, Fraction(fps), crf=12) as writer:
        for i, frame in enumerate(face_frames(n_frames, size, face_px=int(min(size) * 0.8))):
            if i in blank_frames:
                frame[CODE_CELL:] = 90  # no face below the code strip
            for bit in range(CODE_BITS):
                frame[:CODE_CELL, bit * CODE_CELL : (bit + 1) * CODE_CELL] = 255 if (i >> bit) & 1 else 0
            writer.write(frame)
    return path


def frame_indices(frames: np.ndarray) -> list[int]:
    """The index each decoded frame carries (robust to x264: each bit is the mean of its block)."""
    cells = frames[:, 2 : CODE_CELL - 2, : CODE_BITS * CODE_CELL].astype(np.float32).mean(axis=(1, 3))
    bits = cells.reshape(len(frames), CODE_BITS, CODE_CELL).mean(axis=2) > 128
    return [int(sum(1 << b for b in range(CODE_BITS) if row[b])) for row in bits]


def read_frames(path: Path) -> np.ndarray:
    with VideoReader(path) as reader:
        return np.stack(list(reader))


def pipeline_track(path: Path):
    """The face track the pipeline finds in `path` (same detector, chunks and detection stride)."""
    from lipsync_runner.faces import HaarFaceDetector, track_faces
    from lipsync_runner.pipeline.job import DETECT_CHUNK, PipelineOptions

    frames = read_frames(path)
    chunks = (frames[k : k + DETECT_CHUNK] for k in range(0, len(frames), DETECT_CHUNK))
    return track_faces(chunks, HaarFaceDetector(), detect_every=PipelineOptions().detect_every)


# ------------------------------------------------------------------ speech with pauses

@dataclass(frozen=True)
class Speech:
    path: Path
    seconds: float
    spoken: tuple[tuple[float, float], ...]  # [start, end) of each phrase, seconds


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def needs_espeak() -> None:
    if not espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no real speech to test with")


def _phrase(text: str, work: Path) -> np.ndarray:
    wav = work / "phrase.wav"
    subprocess.run(["espeak-ng", "-s", "170", "-w", str(wav), text], check=True, capture_output=True)
    pcm = decode_audio(wav, audio_math.SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(pcm) > 0.02)  # espeak pads its output with silence: trim it
    return pcm[loud[0] : loud[-1] + 1]


def write_speech(path: Path, parts: list[str | float]) -> Speech:
    """espeak-ng phrases (str) and pauses of digital silence (float seconds) in order, 16 kHz WAV."""
    from scipy.io import wavfile

    needs_espeak()
    pieces, spoken, pos = [], [], 0
    for part in parts:
        chunk = np.zeros(int(part * audio_math.SAMPLE_RATE), np.float32) if isinstance(part, float) \
            else _phrase(part, path.parent)
        if isinstance(part, str):
            spoken.append((pos / audio_math.SAMPLE_RATE, (pos + len(chunk)) / audio_math.SAMPLE_RATE))
        pieces.append(chunk)
        pos += len(chunk)
    pcm = np.concatenate(pieces)
    wavfile.write(path, audio_math.SAMPLE_RATE, (pcm * 32767).astype(np.int16))
    return Speech(path, len(pcm) / audio_math.SAMPLE_RATE, tuple(spoken))


# ------------------------------------------------------------------ doubles

FLAT_FACE = (255, 0, 255)  # magenta: nothing in the test video looks like it


class FlatModel:
    """The LipSyncModel protocol with no arithmetic: every generated face is flat magenta.

    Where the pipeline generates, the mouth region turns magenta; where it passes through, it
    cannot. Used where what is tested is the plan's execution, not MuseTalk's numerics.
    """

    weights_id = "flat"

    def __init__(self) -> None:
        self.generated = 0

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        return np.zeros((audio_math.step_count(len(pcm)), 5, 384), np.float32)

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        return np.zeros((len(crops), 8, 32, 32), np.float32)

    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        assert len(latents) == len(audio_windows)
        self.generated += len(latents)
        return np.broadcast_to(np.array(FLAT_FACE, np.uint8), (len(latents), 256, 256, 3)).copy()


def magenta_share(frame: np.ndarray, box: np.ndarray) -> float:
    """Share of the box's lower half that is close to FLAT_FACE."""
    x1, y1, x2, y2 = (int(v) for v in box)
    region = frame[(y1 + y2) // 2 : y2, x1:x2].astype(int)
    close = np.abs(region - np.array(FLAT_FACE)).max(axis=-1) < 60
    return float(close.mean())


class RecordingWriter(VideoWriter):
    """The real encoder, also keeping a copy of every frame it was given (before x264 touches them)."""

    recorded: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        arr = np.asarray(frames)
        RecordingWriter.recorded.extend(np.array(arr if arr.ndim == 4 else arr[None]))
        super().write(frames)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Frames the pipeline hands its encoder, in order."""
    import lipsync_runner.pipeline.job as pipeline

    RecordingWriter.recorded = []
    monkeypatch.setattr(pipeline, "VideoWriter", RecordingWriter)
    return RecordingWriter.recorded
