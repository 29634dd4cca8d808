"""Test media: synthetic talking faces, real head photos, speech-like audio, multi-person clips.

Tests, the demo and CPU benchmarks use these beside the tiny models (models/tiny.py).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np


def synthetic_landmarks(x1: float, x2: float, y29: float, chin: float) -> np.ndarray:
    """68 iBUG-like points: jaw contour (0..16) spanning x1..x2 with the chin (8) lowest at
    ``chin``; every other point above the chin; landmark 29 (nose bridge) at y = ``y29``."""
    lm = np.zeros((68, 2))
    cx = (x1 + x2) / 2
    t = np.linspace(-np.pi / 2, np.pi / 2, 17)
    top = y29 - 0.3 * (chin - y29)
    lm[:17, 0] = cx + (x2 - x1) / 2 * np.sin(t)
    lm[:17, 1] = top + (chin - top) * np.cos(t)
    lm[17:, 0] = np.linspace(cx - 0.3 * (x2 - x1), cx + 0.3 * (x2 - x1), 51)
    lm[17:, 1] = np.linspace(y29 - 0.2 * (chin - y29), y29 + 0.7 * (chin - y29), 51)
    lm[29] = (cx, y29)
    return lm


def landmarks_for_boxes(boxes: np.ndarray, *, jitter: float = 0.3, seed: int = 0) -> np.ndarray:
    """[N, 68, 2] synthetic landmarks that follow each crop box (x1, y1, x2, y2; NaN rows for -1
    rows), jittered by ``jitter`` px like a landmark tracker's output."""
    rng = np.random.default_rng(seed)
    lms = np.full((len(boxes), 68, 2), np.nan)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes)):
        if x1 >= 0:
            lms[i] = synthetic_landmarks(x1 + 4, x2 - 4, y29=(y1 + y2 - 10) / 2, chin=y2 - 10)
            lms[i] += rng.normal(0, jitter, (68, 2))
    return lms


# ---------------------------------------------------------------- media


def face_image() -> np.ndarray:
    """A real photographed face (scikit-image's astronaut, public domain), RGB uint8 512x512."""
    from skimage import data

    return data.astronaut()


def face_placement(i: int, size: tuple[int, int] = (320, 240), face_px: int = 200) -> tuple[float, int, int]:
    """Where face_frames puts the astronaut in frame i: (scale, x0, y0). A point (x, y) of the
    astronaut photo lands at ``((x - 100) * scale + x0, y * scale + y0)`` in that frame."""
    width, height = size
    dx = int(round(6 * np.sin(2 * np.pi * i / 50)))
    dy = int(round(3 * np.cos(2 * np.pi * i / 70)))
    return face_px / 300.0, (width - face_px) // 2 + dx, max(0, (height - face_px) // 2 + dy)


def face_frames(n: int, size: tuple[int, int] = (320, 240), *, face_px: int = 200, seed: int = 0):
    """Yield n RGB frames (width, height) with the astronaut's head moving slowly, like a talking head."""
    import cv2

    width, height = size
    img = face_image()[:300, 100:400]  # head and shoulders
    img = cv2.resize(img, (face_px, face_px), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(seed)
    background = np.full((height, width, 3), (70, 90, 110), np.uint8)
    for i in range(n):
        frame = background.copy()
        _, x0, y0 = face_placement(i, size, face_px)
        h = min(face_px, height - y0)
        frame[y0 : y0 + h, x0 : x0 + face_px] = img[:h]
        frame = np.clip(frame.astype(np.int16) + rng.integers(-2, 3, frame.shape), 0, 255).astype(np.uint8)
        yield frame


def write_face_video(path: Path | str, *, seconds: float = 2.0, fps: Fraction | float = 25,
                     size: tuple[int, int] = (320, 240), face_px: int | None = None,
                     blank_frames: tuple[int, ...] = (), with_audio: bool = False) -> Path:
    """An H.264 talking-head clip; frames listed in blank_frames have no face (background only)."""
    from lipsync_runner.media.ffmpeg import VideoWriter

    fps = Fraction(fps).limit_denominator(1001)
    n = int(seconds * fps)
    path = Path(path)
    face_px = face_px or int(min(size) * 0.8)
    audio = None
    if with_audio:
        audio = write_speech_like_audio(path.with_suffix(".tmp.wav"), seconds=seconds)
    try:
        with VideoWriter(path, size[0], size[1], fps, audio_path=audio, crf=12) as writer:
            for i, frame in enumerate(face_frames(n, size, face_px=face_px)):
                if i in blank_frames:
                    frame = np.full_like(frame, 90)
                writer.write(frame)
    finally:
        if audio is not None:
            audio.unlink(missing_ok=True)
    return path


def speech_like_signal(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Syllable-rate amplitude-modulated harmonics with pauses: speech-like energy, float32 mono."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 2
    pauses = (np.sin(2 * np.pi * 0.5 * t) > -0.6).astype(float)
    noise = rng.normal(0, 0.02, t.shape)
    return (0.3 * voice * syllables * pauses + noise).astype(np.float32)


def write_speech_like_audio(path: Path | str, *, seconds: float = 2.0, sample_rate: int = 44100) -> Path:
    """Write speech_like_signal to any format ffmpeg infers from the suffix (wav, mp3, m4a, aac, ogg)."""
    from lipsync_runner.media.ffmpeg import ffmpeg_exe

    path = Path(path)
    pcm = speech_like_signal(seconds, sample_rate)
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(sample_rate), "-ac", "1",
           "-i", "-"]
    if path.suffix == ".ogg":
        cmd += ["-c:a", "libvorbis"] if _has_encoder("libvorbis") else ["-c:a", "vorbis", "-strict", "-2", "-ac", "2"]
    elif path.suffix in (".m4a", ".aac"):
        cmd += ["-c:a", "aac"]
    cmd.append(str(path))
    subprocess.run(cmd, input=pcm.tobytes(), check=True)
    return path


def _has_encoder(name: str) -> bool:
    from lipsync_runner.media.ffmpeg import ffmpeg_exe

    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return f" {name} " in out


#: Real photographs of two different people, cropped to a square head shot with the face in the
#: middle (the face box is about half the side): scikit-image's astronaut (Eileen Collins, NASA)
#: and matplotlib's sample photo of Grace Hopper (US Navy); both public domain.
#: name -> (crop x1, y1, side in the original photo; mouth centre as fractions of the crop)
HEAD_PHOTOS: dict[str, tuple[tuple[int, int, int], tuple[float, float]]] = {
    "astronaut": ((124, 20, 200), (0.49, 0.625)),
    "hopper": ((44, 5, 440), (0.495, 0.62)),
}


def head_photo(name: str) -> np.ndarray:
    """A square RGB head shot of a real person (see HEAD_PHOTOS)."""
    if name == "astronaut":
        image = face_image()
    elif name == "hopper":
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            image = np.asarray(im.convert("RGB"))
    else:
        raise ValueError(f"unknown photo {name!r} (expected one of {sorted(HEAD_PHOTOS)})")
    (x, y, side), _ = HEAD_PHOTOS[name]
    return np.ascontiguousarray(image[y : y + side, x : x + side])


@dataclass
class Actor:
    """One person in a constructed clip: a head shot moved along a path, painted in list order.

    ``mouth`` (0..1 per frame) opens the mouth: a dark mouth cavity drawn over the lips, as tall
    as ``0.06 * size * mouth``. ``visible`` False hides the person on that frame."""

    photo: str
    size: int  # side of the head shot in the frame, px
    centers: np.ndarray  # (n, 2) float: head shot centre x, y per frame
    mouth: np.ndarray | None = None
    visible: np.ndarray | None = None

    def tile(self, i: int) -> tuple[int, int, int, int]:
        """Where the head shot is on frame i: x1, y1, x2, y2 (may reach outside the frame)."""
        cx, cy = self.centers[i]
        x1, y1 = int(round(cx - self.size / 2)), int(round(cy - self.size / 2))
        return x1, y1, x1 + self.size, y1 + self.size

    def face_center(self, i: int) -> tuple[float, float]:
        x1, y1, _, _ = self.tile(i)
        return x1 + self.size / 2, y1 + self.size / 2

    def mouth_center(self, i: int) -> tuple[float, float]:
        x1, y1, _, _ = self.tile(i)
        mx, my = HEAD_PHOTOS[self.photo][1]
        return x1 + mx * self.size, y1 + my * self.size


def actor_frames(actors: list[Actor], n: int, size: tuple[int, int] = (480, 270), *, seed: int = 0):
    """Yield n RGB frames (width, height) showing the actors (later ones in front), with sensor noise."""
    import cv2

    width, height = size
    tiles = {a.photo + str(a.size): cv2.resize(head_photo(a.photo), (a.size, a.size), interpolation=cv2.INTER_AREA)
             for a in actors}
    rng = np.random.default_rng(seed)
    for i in range(n):
        frame = np.full((height, width, 3), (70, 90, 110), np.uint8)
        for a in actors:
            if a.visible is not None and not a.visible[i]:
                continue
            tile = tiles[a.photo + str(a.size)]
            if a.mouth is not None and a.mouth[i] > 0:
                tile = tile.copy()
                mx, my = HEAD_PHOTOS[a.photo][1]
                axes = (max(1, int(round(0.08 * a.size))), max(1, int(round(0.03 * a.size * float(a.mouth[i])))))
                cv2.ellipse(tile, (int(round(mx * a.size)), int(round(my * a.size))), axes, 0, 0, 360,
                            (35, 12, 18), -1, cv2.LINE_AA)
            x1, y1, x2, y2 = a.tile(i)
            fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
            if fx2 > fx1 and fy2 > fy1:
                frame[fy1:fy2, fx1:fx2] = tile[fy1 - y1 : fy2 - y1, fx1 - x1 : fx2 - x1]
        noise = rng.integers(-2, 3, frame.shape)
        yield np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_actors_video(path: Path | str, actors: list[Actor], n: int, *, size: tuple[int, int] = (480, 270),
                       fps: Fraction | float = 25, audio: Path | str | None = None) -> Path:
    """An H.264 clip of actor_frames (optionally with a sound track muxed in)."""
    from lipsync_runner.media.ffmpeg import VideoWriter

    path = Path(path)
    with VideoWriter(path, size[0], size[1], Fraction(fps).limit_denominator(1001), audio_path=audio,
                     crf=12) as writer:
        for frame in actor_frames(actors, n, size):
            writer.write(frame)
    return path


def two_people(n: int, size: tuple[int, int] = (480, 270), *, left: str = "hopper", right: str = "astronaut",
               left_px: int = 170, right_px: int = 140, wobble: float = 6.0) -> list[Actor]:
    """Two people side by side, their heads moving a little (different paths, so they never move as one)."""
    width, height = size
    t = np.arange(n)
    lx = 0.27 * width + wobble * np.sin(2 * np.pi * t / 40)
    ly = 0.5 * height + 0.5 * wobble * np.cos(2 * np.pi * t / 55)
    rx = 0.73 * width + wobble * np.sin(2 * np.pi * t / 33 + 1.0)
    ry = 0.5 * height + 0.5 * wobble * np.sin(2 * np.pi * t / 47)
    return [Actor(left, left_px, np.stack([lx, ly], 1)), Actor(right, right_px, np.stack([rx, ry], 1))]
