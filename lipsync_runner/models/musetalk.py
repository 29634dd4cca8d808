"""The MuseTalk model component: plain arrays in, plain arrays out.

These three calls are the whole contract between the CPU side of the pipeline and
the GPU: the local pipeline calls them directly, the BentoML runner service serves
exactly them with adaptive batching. Every call is batch-first and its result does
not depend on which other rows share the batch (beyond float rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lipsync_runner.audio import windows as audio
from lipsync_runner.models import ModelsLayout, load_unet, load_vae, load_whisper_encoder, resolve_layout
from lipsync_runner.errors import LipSyncError

log = logging.getLogger(__name__)

CROP_SIZE = 256  # MuseTalk's face crop; the VAE maps it to a 32x32 latent



def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible; an explicit cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LipSyncError(f"device {device!r} was requested but no CUDA GPU is available")
    return device


class LipSyncModel(Protocol):
    """What the pipeline needs from a model, local or remote."""

    def audio_features(self, pcm: np.ndarray) -> np.ndarray: ...
    def prepare(self, crops: np.ndarray) -> np.ndarray: ...
    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelInfo:
    version: str
    device: str
    dtype: str
    models_dir: str


class MuseTalk:
    """UNet + VAE + Whisper encoder on one device."""

    def __init__(self, unet, vae, whisper_encoder, feature_extractor, *, device: str, dtype: torch.dtype,
                 layout: ModelsLayout) -> None:
        self.unet = unet
        self.vae = vae
        self.whisper_encoder = whisper_encoder
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype
        self.layout = layout
        self.scaling_factor = float(vae.config.scaling_factor)
        self.timestep = torch.zeros((), dtype=torch.long, device=self.device)

    @classmethod
    def from_pretrained(cls, models_dir: Path | str | None, *, device: str = "auto", version: str = "auto",
                        dtype: torch.dtype | None = None, compile: bool = False) -> "MuseTalk":
        layout = resolve_layout(models_dir, version)
        device = resolve_device(device)
        if dtype is None:
            # fp16 halves memory and runs on tensor cores; CPUs gain nothing from it.
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        log.info("loading MuseTalk %s from %s on %s (%s)", layout.version, layout.root, device, dtype)
        unet = load_unet(layout, device=device, dtype=dtype)
        vae = load_vae(layout, device=device, dtype=dtype)
        encoder, extractor = load_whisper_encoder(layout, device=device, dtype=dtype)
        model = cls(unet, vae, encoder, extractor, device=device, dtype=dtype, layout=layout)
        if device.startswith("cuda"):
            model.tune_for_gpu(compile=compile)
        return model

    def tune_for_gpu(self, *, compile: bool = False) -> None:
        """Channels-last convolutions and cuDNN autotuning; optionally torch.compile (slow first batch)."""
        torch.backends.cudnn.benchmark = True  # batch shapes repeat: autotuning pays off
        torch.backends.cuda.matmul.allow_tf32 = True
        self.unet.to(memory_format=torch.channels_last)
        self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.unet = torch.compile(self.unet, dynamic=True)
            self.vae.decoder = torch.compile(self.vae.decoder, dynamic=True)

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(self.layout.version, str(self.device), str(self.dtype).removeprefix("torch."),
                         str(self.layout.root))

    @property
    def weights_id(self) -> str:
        """Changes whenever a model file changes (name, size, modification time): cache keys use it."""
        return self.layout.fingerprint()

    @property
    def tokens_per_frame(self) -> int:
        return audio.WINDOW_STEPS * (self.whisper_encoder.config.encoder_layers + 1)

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        """16 kHz mono float PCM -> [S, layers + 1, d_model] encoder hidden states, S = floor(sec * 50)."""
        pcm = np.asarray(pcm, dtype=np.float32)
        states = self.encode_pieces(audio.pad_pieces(pcm))
        return states.reshape(-1, *states.shape[2:])[: audio.step_count(len(pcm))]

    @torch.inference_mode()
    def encode_pieces(self, pieces: np.ndarray) -> np.ndarray:
        """[P, 480000] zero-padded 30 s pieces -> [P, 1500, layers + 1, d_model] hidden states.

        Whisper's feature extractor pads each piece with zeros to 30 s anyway (and its
        max-minus-8 clamp sees that padding), so padding beforehand changes nothing.
        """
        mel = self.feature_extractor(list(pieces), sampling_rate=audio.SAMPLE_RATE, return_tensors="pt").input_features
        out = self.whisper_encoder(mel.to(self.device, self.dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=2).float().cpu().numpy()

    @torch.inference_mode()
    def prepare(self, crops: np.ndarray) -> np.ndarray:
        """[B, 256, 256, 3] uint8 RGB crops -> [B, 8, 32, 32] float32 latents (masked first, then reference)."""
        # MuseTalk's order (musetalk/models/vae.py preprocess_img): /255 in float64, to float32, mask,
        # then (x - 0.5) / 0.5, then the model's dtype. The input is made a contiguous NCHW tensor:
        # a permuted (channels-last strided) view sent the CPU convolutions down another kernel
        # path and moved the latents by ~0.2-1 % of their range. On CUDA, tune_for_gpu's
        # channels-last weights still select the NHWC kernels (one cheap input conversion).
        x = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        x = (x.permute(0, 3, 1, 2).double() / 255.0).float().contiguous()
        masked = x.clone()
        masked[:, :, CROP_SIZE // 2 :, :] = 0  # hide the lower half: the part the UNet must fill in
        images = ((torch.cat([masked, x]) - 0.5) / 0.5).to(self.dtype)
        # The distribution mean, not a sample: deterministic, and what training used.
        latents = self.vae.encode(images).latent_dist.mode() * self.scaling_factor
        b = len(crops)
        return torch.cat([latents[:b], latents[b:]], dim=1).float().cpu().numpy()

    @torch.inference_mode()
    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        """[B, 8, 32, 32] latents + [B, 50, 384] audio windows -> [B, 256, 256, 3] uint8 RGB faces."""
        lat = torch.from_numpy(np.ascontiguousarray(latents)).to(self.device, self.dtype)
        pe = torch.from_numpy(audio.positional_encoding(audio_windows.shape[1], audio_windows.shape[2]).copy())
        cond = torch.from_numpy(np.ascontiguousarray(audio_windows)).float() + pe
        cond = cond.to(self.device, self.dtype)
        pred = self.unet(lat, self.timestep, encoder_hidden_states=cond).sample
        image = self.vae.decode(pred / self.scaling_factor).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).cpu().numpy()
