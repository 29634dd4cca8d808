"""MuseTalk model files: layout, loading and download."""

from lipsync_runner.models.layout import ModelsLayout, resolve_layout
from lipsync_runner.models.loading import load_unet, load_vae, load_whisper_encoder

__all__ = ["ModelsLayout", "resolve_layout", "load_unet", "load_vae", "load_whisper_encoder"]
