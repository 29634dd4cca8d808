"""Tiny random-weight MuseTalk models in the real on-disk layout, and test media.

Tests and CPU benchmarks use these: same file names, same formats, same tensor shapes
at every boundary (8-channel 32x32 latents, 384-wide audio tokens, 256x256 crops), just
far fewer channels and layers, so the loading code cannot tell them from the real ones.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

# The published musetalk.json (TMElyralab/MuseTalk, v1.0 and v1.5 share it).
FULL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse's config.json.
FULL_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# openai/whisper-tiny's encoder dimensions (the decoder is never run).
FULL_WHISPER_CONFIG: dict[str, Any] = {
    "d_model": 384, "encoder_layers": 4, "encoder_attention_heads": 6, "encoder_ffn_dim": 1536,
    "decoder_layers": 4, "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 51865,
}

TINY_UNET_CONFIG: dict[str, Any] = {
    **FULL_UNET_CONFIG,
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_VAE_CONFIG: dict[str, Any] = {**FULL_VAE_CONFIG, "block_out_channels": [4, 4, 8, 8], "layers_per_block": 1,
                                   "norm_num_groups": 2}
TINY_WHISPER_CONFIG: dict[str, Any] = {
    **FULL_WHISPER_CONFIG, "encoder_ffn_dim": 64, "encoder_attention_heads": 2,
    "decoder_layers": 1, "decoder_ffn_dim": 32, "decoder_attention_heads": 2, "vocab_size": 64,
    "max_target_positions": 16, "decoder_start_token_id": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}


def write_models_dir(root: Path | str, *, size: str = "tiny", versions: tuple[str, ...] = ("v15",),
                     seed: int = 0) -> Path:
    """Write a random-weight MuseTalk models directory in the exact real layout; returns root."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    tiny = size == "tiny"
    root = Path(root)
    torch.manual_seed(seed)
    unet_config = TINY_UNET_CONFIG if tiny else FULL_UNET_CONFIG
    unet = UNet2DConditionModel.from_config(unet_config)
    folders = {"v15": ("musetalkV15", "unet.pth"), "v1": ("musetalk", "pytorch_model.bin")}
    for version in versions:
        folder, weights = folders[version]
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "musetalk.json").write_text(json.dumps(unet_config, indent=2))
        torch.save(unet.state_dict(), root / folder / weights)  # MuseTalk ships a plain state dict

    vae = AutoencoderKL.from_config(TINY_VAE_CONFIG if tiny else FULL_VAE_CONFIG)
    vae.save_pretrained(root / "sd-vae")

    whisper = WhisperModel(WhisperConfig(**(TINY_WHISPER_CONFIG if tiny else FULL_WHISPER_CONFIG)))
    whisper.save_pretrained(root / "whisper")
    WhisperFeatureExtractor(feature_size=80).save_pretrained(root / "whisper")
    return root


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
    from .media import VideoWriter

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
    from .media import ffmpeg_exe

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
    from .media import ffmpeg_exe

    out = subprocess.run([ffmpeg_exe(), "-hide_banner", "-encoders"], capture_output=True, text=True).stdout
    return f" {name} " in out


# ---------------------------------------------------------------- face parsing


def write_face_parsing(models_dir: Path | str, *, seed: int = 0) -> Path:
    """Random-weight BiSeNet face parsing in MuseTalk's files: ``face-parse-bisent/79999_iter.pth``
    (the whole network's state dict) and ``resnet18-5c106cde.pth`` (torchvision's ResNet-18 layout:
    no ``num_batches_tracked``, with the ImageNet ``fc`` classifier). Full size: the network has
    no config file, so it cannot be shrunk (about 100 MB together)."""
    import torch

    from .models.face_parsing import PARSING_DIR, PARSING_WEIGHTS, RESNET_WEIGHTS, BiSeNet

    torch.manual_seed(seed)
    folder = Path(models_dir) / PARSING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    net = BiSeNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as trained weights have
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), folder / PARSING_WEIGHTS)
    trunk = {k: v for k, v in net.cp.resnet.state_dict().items() if not k.endswith("num_batches_tracked")}
    trunk["fc.weight"] = torch.randn(1000, 512) * 0.01
    trunk["fc.bias"] = torch.zeros(1000)
    torch.save(trunk, folder / RESNET_WEIGHTS)
    return folder


# ---------------------------------------------------------------- several people on screen

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
    from .media import VideoWriter

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
