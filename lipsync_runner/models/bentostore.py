"""MuseTalk weights in the BentoML model store, so that `bentoml build` packs them into the Bento.

    python -m lipsync_runner import-models --from models/        # -> musetalk:<version>

The service uses the store when MUSETALK_MODELS_DIR is not set (see service.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lipsync_runner.models.layout import UNET_FILES, resolve_layout

DEFAULT_MODEL_NAME = "musetalk"


def import_models_dir(models_dir: Path | str, *, name: str = DEFAULT_MODEL_NAME) -> str:
    """Copy a checked MuseTalk models directory into the store; returns the new model's tag."""
    import bentoml

    layout = resolve_layout(models_dir)  # refuse a directory that would not load
    root = layout.root
    parts = [p for p in {*(f.split("/")[0] for f, _ in UNET_FILES.values()), "sd-vae", "whisper",
                         "face-alignment", "face-parse-bisent"} if (root / p).is_dir()]
    versions = sorted(v for v, (cfg, _) in UNET_FILES.items() if (root / cfg).is_file())
    with bentoml.models.create(name, labels={"unet_versions": "-".join(versions)},
                               metadata={"parts": sorted(parts), "default_version": layout.version}) as model:
        for part in parts:
            shutil.copytree(root / part, Path(model.path) / part)
    return str(model.tag)
