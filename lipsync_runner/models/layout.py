"""Where each file of a MuseTalk models directory lives (MuseTalk's own layout).

    models/
      musetalkV15/musetalk.json  musetalkV15/unet.pth          (v1.5, default)
      musetalk/musetalk.json     musetalk/pytorch_model.bin    (v1.0)
      sd-vae/config.json         sd-vae/diffusion_pytorch_model.{safetensors,bin}
      whisper/config.json        whisper/{model.safetensors,pytorch_model.bin}  whisper/preprocessor_config.json
      face-alignment/            optional S3FD + FAN weights for the quality face detector
      face-parse-bisent/         optional 79999_iter.pth + resnet18-5c106cde.pth: MuseTalk's face-parsing blend
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lipsync_runner.errors import ModelFilesError

Version = Literal["v15", "v1"]

UNET_FILES: dict[str, tuple[str, str]] = {
    "v15": ("musetalkV15/musetalk.json", "musetalkV15/unet.pth"),
    "v1": ("musetalk/musetalk.json", "musetalk/pytorch_model.bin"),
}
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WHISPER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
FACE_PARSING_DIR = "face-parse-bisent"

EXPECTED_LAYOUT = __doc__.split("\n\n", 1)[1].rstrip()


@dataclass(frozen=True)
class ModelsLayout:
    root: Path
    version: Version

    @property
    def unet_config(self) -> Path:
        return self.root / UNET_FILES[self.version][0]

    @property
    def unet_weights(self) -> Path:
        return self.root / UNET_FILES[self.version][1]

    @property
    def vae_dir(self) -> Path:
        return self.root / "sd-vae"

    @property
    def whisper_dir(self) -> Path:
        return self.root / "whisper"

    @property
    def face_alignment_dir(self) -> Path:
        return self.root / "face-alignment"

    @property
    def face_parsing_dir(self) -> Path:
        return self.root / FACE_PARSING_DIR

    def weight_files(self) -> list[Path]:
        """The files whose content defines the model (for cache keys and integrity checks)."""
        files = [self.unet_config, self.unet_weights, self.vae_dir / "config.json", self.whisper_dir / "config.json"]
        files += [p for p in (self.vae_dir / n for n in VAE_WEIGHTS) if p.exists()][:1]
        files += [p for p in (self.whisper_dir / n for n in WHISPER_WEIGHTS) if p.exists()][:1]
        return files

    def fingerprint(self) -> str:
        """A short id of the exact model files in use (cheap: no hashing of gigabytes)."""
        import hashlib

        parts = [f"{self.version}"]
        for f in self.weight_files():
            st = f.stat()
            parts.append(f"{f.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def check(self) -> None:
        """Raise ModelFilesError naming the first missing or unreadable file."""
        _require_file(self.unet_config, json_file=True)
        _require_file(self.unet_weights)
        _require_file(self.vae_dir / "config.json", json_file=True)
        _require_one_of(self.vae_dir, VAE_WEIGHTS)
        _require_file(self.whisper_dir / "config.json", json_file=True)
        _require_file(self.whisper_dir / "preprocessor_config.json", json_file=True)
        _require_one_of(self.whisper_dir, WHISPER_WEIGHTS)


def _missing(path: Path, what: str) -> ModelFilesError:
    return ModelFilesError(f"{what}: {path}\nExpected a MuseTalk models directory laid out as:\n{EXPECTED_LAYOUT}")


def _require_file(path: Path, *, json_file: bool = False) -> None:
    if not path.is_file():
        raise _missing(path, "missing model file")
    if path.stat().st_size == 0:
        raise _missing(path, "empty model file")
    if json_file:
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise _missing(path, f"broken JSON in model file ({exc})") from None


def _require_one_of(folder: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if (folder / name).is_file():
            _require_file(folder / name)
            return
    raise _missing(folder / names[0], f"missing model weights (one of {', '.join(names)})")


def resolve_layout(models_dir: Path | str | None, version: str = "auto") -> ModelsLayout:
    """Find the models directory and pick the UNet version (v1.5 when both are present)."""
    if models_dir is None:
        raise ModelFilesError(
            "no models directory given: pass --models-dir or set MUSETALK_MODELS_DIR "
            "(python -m lipsync_runner download-models --to DIR fetches the weights)"
        )
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        raise _missing(root, "models directory not found")
    if version == "auto":
        version = "v15" if (root / UNET_FILES["v15"][1]).exists() or not (root / UNET_FILES["v1"][1]).exists() else "v1"
    if version not in UNET_FILES:
        raise ModelFilesError(f"unknown MuseTalk version {version!r}: use v15 or v1")
    layout = ModelsLayout(root=root, version=version)  # type: ignore[arg-type]
    layout.check()
    return layout
