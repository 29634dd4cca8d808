"""Build MuseTalk's networks from a models directory, diffusers/transformers style.

Every architecture detail comes from the config files in the directory, so a tiny
random-weight model in the same layout loads through exactly this code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lipsync_runner.errors import ModelFilesError
from lipsync_runner.models.layout import ModelsLayout

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

log = logging.getLogger(__name__)


def _broken(path: Path, exc: BaseException) -> ModelFilesError:
    return ModelFilesError(f"cannot load model file {path}: {type(exc).__name__}: {exc}")


def _place(module, device: str, dtype: "torch.dtype | None"):
    """Move to the device and, only when asked, to another dtype; inference mode, no grads."""
    module = module.to(device)
    if dtype is not None and dtype != module.dtype:
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


def load_unet(layout: ModelsLayout, *, device: str = "cpu", dtype: "torch.dtype | None" = None) -> "UNet2DConditionModel":
    """MuseTalk's UNet: diffusers `UNet2DConditionModel` from musetalk.json + a plain state dict."""
    import torch
    from diffusers import UNet2DConditionModel

    config = json.loads(layout.unet_config.read_text())
    try:
        unet = UNet2DConditionModel.from_config(config)
    except Exception as exc:  # a config diffusers cannot build is a broken file, not a crash
        raise _broken(layout.unet_config, exc) from None
    try:
        # weights_only: never unpickle arbitrary objects from a downloaded file
        state = torch.load(layout.unet_weights, map_location="cpu", weights_only=True)
        unet.load_state_dict(state, strict=True)
    except Exception as exc:
        raise _broken(layout.unet_weights, exc) from None
    return _place(unet, device, dtype)


def load_vae(layout: ModelsLayout, *, device: str = "cpu", dtype: "torch.dtype | None" = None) -> "AutoencoderKL":
    """stabilityai/sd-vae-ft-mse in diffusers' folder layout."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(layout.vae_dir, local_files_only=True)
    except Exception as exc:
        raise _broken(layout.vae_dir, exc) from None
    return _place(vae, device, dtype)


def load_whisper_encoder(
    layout: ModelsLayout, *, device: str = "cpu", dtype: "torch.dtype | None" = None
) -> tuple["WhisperEncoder", "WhisperFeatureExtractor"]:
    """Whisper-tiny's encoder (the decoder is dropped) and its log-mel feature extractor."""
    from transformers import AutoFeatureExtractor, WhisperModel

    try:
        extractor = AutoFeatureExtractor.from_pretrained(layout.whisper_dir, local_files_only=True)
    except Exception as exc:
        raise _broken(layout.whisper_dir / "preprocessor_config.json", exc) from None
    try:
        encoder = WhisperModel.from_pretrained(layout.whisper_dir, local_files_only=True).get_encoder()
    except Exception as exc:
        raise _broken(layout.whisper_dir, exc) from None
    return _place(encoder, device, dtype), extractor
