"""Fetch the real MuseTalk weights from the model hub into MuseTalk's own layout."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubFiles:
    repo_id: str
    subdir: str  # where the files land inside the models directory
    files: tuple[str, ...]


def hub_files(version: str = "v15") -> list[HubFiles]:
    """What to download for a MuseTalk version ("v15", "v1" or "all")."""
    unet = {
        "v15": ("musetalkV15/musetalk.json", "musetalkV15/unet.pth"),
        "v1": ("musetalk/musetalk.json", "musetalk/pytorch_model.bin"),
    }
    versions = ["v15", "v1"] if version == "all" else [version]
    return [
        HubFiles("TMElyralab/MuseTalk", "", tuple(f for v in versions for f in unet[v])),
        # safetensors, not pickles: nothing executable in what we fetch
        HubFiles("stabilityai/sd-vae-ft-mse", "sd-vae", ("config.json", "diffusion_pytorch_model.safetensors")),
        HubFiles("openai/whisper-tiny", "whisper", ("config.json", "model.safetensors", "preprocessor_config.json")),
    ]


# face_alignment's published S3FD and 2D-FAN weights (the quality face detector; optional).
FACE_ALIGNMENT_URLS = {
    "s3fd-619a316812.pth": "https://www.adrianbulat.com/downloads/python-fan/s3fd-619a316812.pth",
    "2DFAN4-11f355bf06.pth.tar": "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar",
}


def download_models(
    to: Path | str,
    *,
    version: str = "v15",
    face_alignment: bool = False,
    hf_hub_download: Callable[..., str] | None = None,
    download_url: Callable[[str, str], None] | None = None,
) -> Path:
    """Download into `to`, skipping files already present; returns the models directory.

    The two download functions are parameters so tests can stand in for the network.
    huggingface_hub shows a progress bar per file and resumes interrupted downloads.
    """
    if hf_hub_download is None:
        from huggingface_hub import hf_hub_download
    root = Path(to).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    for group in hub_files(version):
        local_dir = root / group.subdir if group.subdir else root
        for filename in group.files:
            if (local_dir / filename).is_file():
                log.info("present: %s", local_dir / filename)
                continue
            log.info("downloading %s/%s", group.repo_id, filename)
            hf_hub_download(repo_id=group.repo_id, filename=filename, local_dir=str(local_dir))
    if face_alignment:
        if download_url is None:
            from torch.hub import download_url_to_file

            def download_url(url: str, dst: str) -> None:
                download_url_to_file(url, dst, progress=True)

        fa_dir = root / "face-alignment"
        fa_dir.mkdir(exist_ok=True)
        for filename, url in FACE_ALIGNMENT_URLS.items():
            if not (fa_dir / filename).is_file():
                download_url(url, str(fa_dir / filename))
    return root
