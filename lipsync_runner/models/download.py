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


# MuseTalk's face-parsing blend (download_weights.sh): BiSeNet from face-parsing.PyTorch's Google
# Drive file, and torchvision's ImageNet ResNet-18 it is initialised from. MuseTalk fetches the
# first with gdown; a file of this size (~53 MB) needs no confirmation step.
FACE_PARSING_URLS = {
    "79999_iter.pth": "https://drive.google.com/uc?export=download&id=154JgKpzCPW82qINcVieuPH3fZ2e0P812",
    "resnet18-5c106cde.pth": "https://download.pytorch.org/models/resnet18-5c106cde.pth",
}


def _fetch_checkpoint(url: str, dst: Path, download_url: Callable[[str, str], None]) -> None:
    """Download to a temporary name and keep it only if it is not a web page (a quota or login page)."""
    from lipsync_runner.errors import ModelFilesError

    part = dst.with_name(dst.name + ".part")
    download_url(url, str(part))
    with open(part, "rb") as f:
        head = f.read(64).lstrip().lower()
    if not head or head.startswith((b"<!doctype", b"<html", b"<")):
        part.unlink(missing_ok=True)
        raise ModelFilesError(f"{url} returned a web page, not {dst.name}: download it by hand into {dst}")
    part.replace(dst)


def download_models(
    to: Path | str,
    *,
    version: str = "v15",
    face_alignment: bool = False,
    face_parsing: bool = True,
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
    if download_url is None:
        def download_url(url: str, dst: str) -> None:
            from torch.hub import download_url_to_file

            download_url_to_file(url, dst, progress=True)

    if face_parsing:
        fp_dir = root / "face-parse-bisent"
        fp_dir.mkdir(exist_ok=True)
        for filename, url in FACE_PARSING_URLS.items():
            if not (fp_dir / filename).is_file():
                log.info("downloading %s", url)
                _fetch_checkpoint(url, fp_dir / filename, download_url)
    if face_alignment:
        fa_dir = root / "face-alignment"
        fa_dir.mkdir(exist_ok=True)
        for filename, url in FACE_ALIGNMENT_URLS.items():
            if not (fa_dir / filename).is_file():
                download_url(url, str(fa_dir / filename))
    return root
