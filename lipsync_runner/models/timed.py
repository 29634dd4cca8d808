"""A MuseTalk stand-in that takes the time one H100 would, and computes nothing on a GPU.

``LIP_SYNC_RUNNER_MODEL=timed`` makes the runner serve this instead of the real networks, so the
API side (decode, faces, crops, transport, blend, encode) can be measured on a machine without a
GPU, against a model that answers when an H100 would. Its calls take and return the same arrays
as :class:`~lipsync_runner.models.musetalk.MuseTalk` (the :class:`LipSyncModel` calls plus
``encode_pieces``), so everything around it runs for real; the outputs are constants of the
right shapes and dtypes (zero latents and audio states, mid-grey faces).

The latency model (:class:`LatencyModel`), per call of ``n`` frames::

    seconds = launch + weight_bytes / bandwidth                      (fixed: once per call)
            + n * (tflop_per_frame / (peak * efficiency)             (compute, per frame)
                   + host_bytes_per_frame / pcie)                    (copies to and from the GPU)

- FLOP per frame (issue 21's paper review): UNet 0.178 TFLOP, VAE decode 0.622, the two VAE
  encodes of ``prepare`` (masked and reference crop) 0.545; Whisper-tiny's encoder about 0.033 per
  30 s piece. ``generate`` is UNet + decode (0.800 TFLOP per frame).
- ``peak``: 790 TFLOP/s, the dense bf16 matmul rate measured on the lent H100; ``bandwidth``
  3 TB/s (HBM3).
- ``efficiency`` 0.5: convolutions at MuseTalk's sizes (256x256 crops, 32x32 latents, GroupNorm
  and attention between them) reach far less than a large matmul. 0.5 gives 2.0 ms per generated
  frame at any batch size, the "about 2 ms per frame at batch 32 in fp16" the issue's review calls
  realistic; the device kit's ``core`` step measures the real figure (set it with
  ``LIP_SYNC_TIMED_EFFICIENCY``).
- The activations of one frame are a few hundred MB of memory traffic (0.1-0.2 ms at 3 TB/s),
  well under the compute time at that efficiency, so the per-frame term is compute-bound; the
  weights (fp16) are read once per call: that and ``launch`` (kernel launches and the
  synchronisation not hidden behind the batch's work, 1 ms) are the fixed cost that batching
  amortises.
- ``pcie`` 25 GB/s: pageable host copies, about 12 us per generated frame (negligible, kept so
  the model says where the bytes go).

One call runs at a time (a lock): the GPU executes one batch after another, whoever calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from lipsync_runner.audio import windows as audio
from lipsync_runner.models.musetalk import CROP_SIZE, ModelInfo

TFLOP = 1e12
GB = 1e9

# Shapes at the runner's boundary (models/musetalk.py, serving/packing.py).
LATENT_SHAPE = (8, 32, 32)  # masked + reference 4-channel latents of a 256x256 crop
D_MODEL = 384  # Whisper-tiny's width: the UNet's cross-attention dimension
ENCODER_LAYERS = 4  # Whisper-tiny's encoder: 4 layers + the embeddings = 5 hidden states per step
WINDOW_TOKENS = audio.WINDOW_STEPS * (ENCODER_LAYERS + 1)  # audio tokens per generated frame (50)
GREY = 128  # what every generated face is


@dataclass(frozen=True)
class LatencyModel:
    """How long one H100 takes for each runner call (module docstring: where each figure comes from)."""

    peak_tflops: float = 790.0  # dense bf16, measured on the lent H100
    efficiency: float = 0.5  # share of the peak MuseTalk's convolutions reach
    bandwidth_tbps: float = 3.0  # HBM3
    pcie_gbps: float = 25.0  # pageable host <-> device copies
    launch_ms: float = 1.0  # per call: launches and synchronisation not hidden behind the batch's work
    unet_tflop: float = 0.178  # per frame
    vae_decode_tflop: float = 0.622  # per frame
    vae_encodes_tflop: float = 0.545  # per frame: the masked and the reference crop
    whisper_tflop: float = 0.033  # per 30 s piece (4 layers x 1500 tokens of width 384, and the conv stem)
    unet_gb: float = 1.72  # fp16 weights: the SD-1.5-sized UNet, about 860 M parameters
    vae_decoder_gb: float = 0.099  # 49.5 M parameters
    vae_encoder_gb: float = 0.068  # 34.2 M parameters
    whisper_gb: float = 0.016  # Whisper-tiny's encoder, about 8 M parameters

    def _call(self, n: int, tflop: float, weights_gb: float, host_bytes: int) -> float:
        fixed = self.launch_ms / 1000 + weights_gb * GB / (self.bandwidth_tbps * TFLOP)
        per_frame = tflop * TFLOP / (self.peak_tflops * TFLOP * self.efficiency) + host_bytes / (self.pcie_gbps * GB)
        return fixed + n * per_frame

    def prepare_s(self, n: int) -> float:
        """n uint8 RGB crops in, n [8, 32, 32] float32 latents out: two VAE encodes each."""
        host = CROP_SIZE * CROP_SIZE * 3 + int(np.prod(LATENT_SHAPE)) * 4
        return self._call(n, self.vae_encodes_tflop, self.vae_encoder_gb, host)

    def generate_s(self, n: int, window_tokens: int = WINDOW_TOKENS) -> float:
        """n latents + audio windows in, n uint8 RGB faces out: UNet + VAE decode each."""
        host = (int(np.prod(LATENT_SHAPE)) + window_tokens * D_MODEL) * 4 + CROP_SIZE * CROP_SIZE * 3
        return self._call(n, self.unet_tflop + self.vae_decode_tflop, self.unet_gb + self.vae_decoder_gb, host)

    def audio_pieces_s(self, n: int) -> float:
        """n 30 s pieces of audio through Whisper-tiny's encoder (the log-mel runs on the host)."""
        host = 80 * 3000 * 4 + 1500 * (ENCODER_LAYERS + 1) * D_MODEL * 4
        return self._call(n, self.whisper_tflop, self.whisper_gb, host)

    def frames_per_second(self, batch: int, *, cold: bool) -> float:
        """Generated frames per second at this batch size: warm = generate only (latents cached),
        cold = prepare and generate of every frame."""
        seconds = self.generate_s(batch) + (self.prepare_s(batch) if cold else 0.0)
        return batch / seconds


class TimedMuseTalk:
    """The :class:`MuseTalk` calls, each sleeping the modelled H100 time; nothing else on a "GPU".

    ``sleep`` is injectable (tests pass a recorder); ``busy_s`` adds up the modelled GPU time.
    """

    def __init__(self, latency: LatencyModel | None = None, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.latency = latency or LatencyModel()
        self._sleep = sleep
        self._device = threading.Lock()  # one batch on the GPU at a time
        self.busy_s = 0.0
        self._extractor = None
        # RunnerCore reads the width of the audio states from the UNet's config, as it does for MuseTalk.
        self.unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=D_MODEL))

    @property
    def info(self) -> ModelInfo:
        return ModelInfo("v15", "timed-h100", "float16", "(none: timed)")

    @property
    def weights_id(self) -> str:
        """Avatar cache keys: latents of the timed model are never mistaken for a real model's."""
        m = self.latency
        return f"timed-h100:{m.peak_tflops:g}x{m.efficiency:g}"

    @property
    def tokens_per_frame(self) -> int:
        return WINDOW_TOKENS

    def _busy(self, seconds: float) -> None:
        with self._device:
            self._sleep(seconds)
            self.busy_s += seconds

    def audio_features(self, pcm: np.ndarray) -> np.ndarray:
        """16 kHz mono float PCM -> [S, 5, 384] encoder states (zeros), S = floor(sec * 50)."""
        pcm = np.asarray(pcm, dtype=np.float32)
        states = self.encode_pieces(audio.pad_pieces(pcm))
        return states.reshape(-1, *states.shape[2:])[: audio.step_count(len(pcm))]

    def encode_pieces(self, pieces: np.ndarray) -> np.ndarray:
        """[P, 480000] 30 s pieces -> [P, 1500, 5, 384] float32 (zeros). The log-mel features are
        computed for real: MuseTalk computes them on the host's CPU, which this model must not hide."""
        if self._extractor is None:
            from transformers import WhisperFeatureExtractor

            self._extractor = WhisperFeatureExtractor(feature_size=80)
        self._extractor(list(pieces), sampling_rate=audio.SAMPLE_RATE, return_tensors="np")
        self._busy(self.latency.audio_pieces_s(len(pieces)))
        return np.zeros((len(pieces), 1500, ENCODER_LAYERS + 1, D_MODEL), np.float32)

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        """[B, 256, 256, 3] uint8 RGB crops -> [B, 8, 32, 32] float32 latents (zeros)."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (CROP_SIZE, CROP_SIZE, 3):
            raise ValueError(f"crops must be [B, {CROP_SIZE}, {CROP_SIZE}, 3], got {list(crops.shape)}")
        self._busy(self.latency.prepare_s(len(crops)))
        return np.zeros((len(crops), *LATENT_SHAPE), np.float32)

    def generate(self, latents: np.ndarray, audio_windows: np.ndarray) -> np.ndarray:
        """[B, 8, 32, 32] latents + [B, T, 384] audio windows -> [B, 256, 256, 3] uint8 faces (grey)."""
        if latents.shape[1:] != LATENT_SHAPE or len(audio_windows) != len(latents):
            raise ValueError(f"latents must be [B, 8, 32, 32] with one audio window each, got "
                             f"{list(latents.shape)} and {list(audio_windows.shape)}")
        self._busy(self.latency.generate_s(len(latents), audio_windows.shape[1]))
        return np.full((len(latents), CROP_SIZE, CROP_SIZE, 3), GREY, np.uint8)
