"""Runtime settings of the inference core, read from the environment.

The names follow the seed guide (`MUSETALK_MODELS_DIR`, `LIP_SYNC_DEVICE`,
`LIP_SYNC_BBOX_SHIFT`) so existing deployments keep working.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIP_SYNC_", extra="ignore")

    models_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("MUSETALK_MODELS_DIR", "LIP_SYNC_MODELS_DIR"),
        description="MuseTalk models directory (musetalkV15/, sd-vae/, whisper/, ...).",
    )
    device: str = Field(default="auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    bbox_shift: int = Field(default=0, ge=-100, le=100, description="MuseTalk v1.0 mouth-box shift in pixels.")
    batch_size: int = Field(default=8, ge=1, le=512, description="Frames per model call.")
    model_version: Literal["auto", "v15", "v1"] = "auto"
    face_detector: Literal["auto", "haar", "fan", "mediapipe"] = "auto"
    extra_margin: int = Field(default=10, ge=0, le=100, description="v1.5: pixels added below the chin.")
    crf: int = Field(default=18, ge=0, le=51, description="x264 quality of the output video.")
    preset: str = Field(default="veryfast", description="x264 preset of the output video.")
    ffmpeg_timeout_s: float = Field(default=3600.0, gt=0, description="Upper bound for one ffmpeg process.")
    compile: bool = Field(default=False, description="torch.compile the UNet and VAE decoder (CUDA only).")
    x264_threads: int = Field(
        default=0, ge=0, le=64,
        description="x264 threads per job; 0: x264's own choice (1.5 per core). 2 costs 13-28 % less CPU "
                    "per frame on a 2-core machine (docs/benchmarks.md): use it when jobs run side by side.")
    hw_codecs: Literal["auto", "off"] = Field(
        default="auto", description="auto: NVDEC/NVENC when ffmpeg has them and a GPU takes a trial frame; off: never.")
    # Speech activity of the new audio (silence=keep): lipsync_runner/speech.py
    vad_aggressiveness: int = Field(default=2, ge=0, le=3, description="WebRTC VAD mode: 0 lenient .. 3 strict.")
    silence_floor_db: float = Field(default=-45.0, le=0, description="Quieter 10 ms frames (dBFS) are silence.")
    min_silence_ms: int = Field(default=200, ge=0, le=5000, description="Shorter pauses count as speech.")
    min_speech_ms: int = Field(default=60, ge=0, le=5000, description="Shorter bursts count as silence.")
    speech_pad_ms: int = Field(default=60, ge=0, le=2000, description="Speech widened by this on both sides.")
    fade_frames: int = Field(default=3, ge=0, le=50,
                             description="Cross-fade frames at each edge of a kept silence or a segment.")
    detect_every: int = Field(
        default=2, ge=1, le=12,
        description="Run the face detector on every k-th frame; the boxes between are interpolated, then smoothed. "
                    "3 cuts the cold path's detector CPU by a third and changes the face track (docs/benchmarks.md).")
    max_spool_gb: float = Field(default=20.0, ge=0,
                                description="A cold job keeps its decoded frames on scratch disk up to this size "
                                            "(one decode); larger videos are decoded twice instead.")
    opencv_threads: int = Field(default=1, ge=0, le=256,
                                description="OpenCV threads in the process that runs the pipeline (0: one per core). "
                                            "Its resizes are small and its stages already run in parallel threads "
                                            "beside ffmpeg, so more threads cost CPU in hand-offs (docs/benchmarks.md).")


def configure_opencv(settings: RunnerSettings) -> None:
    """Apply `opencv_threads` (process-wide, so once where a process that runs the pipeline starts)."""
    import cv2

    if settings.opencv_threads > 0:
        cv2.setNumThreads(settings.opencv_threads)


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible; an explicit cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import LipSyncError

        raise LipSyncError(f"device {device!r} was requested but no CUDA GPU is available")
    return device
