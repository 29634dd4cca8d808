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


def resolve_device(device: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible; an explicit cuda without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import LipSyncError

        raise LipSyncError(f"device {device!r} was requested but no CUDA GPU is available")
    return device
