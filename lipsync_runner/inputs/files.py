"""What an input file may be, shared by uploads (api/uploads.py) and URL fetches (fetch.py):
its field's spec, its display name, sizes in messages."""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass

from lipsync_runner.config import MiB
from lipsync_runner.media.ffmpeg import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS

MAX_DISPLAY_NAME_CHARS = 200


@dataclass(frozen=True)
class FileFieldSpec:
    """One accepted file field: where it goes and what it may be."""

    field: str  # form field name ("video")
    stem: str  # file name stem inside the job directory ("input_video")
    kind: str  # for messages ("video")
    hint_extensions: tuple[str, ...]  # kept on the stored name when the user's name has one (a hint to ffmpeg)
    max_bytes: int


def media_specs(max_video_bytes: int, max_audio_bytes: int) -> dict[str, FileFieldSpec]:
    known = tuple(dict.fromkeys(VIDEO_EXTENSIONS + AUDIO_EXTENSIONS))
    return {
        "video": FileFieldSpec("video", "input_video", "video", known, max_video_bytes),
        "audio": FileFieldSpec("audio", "input_audio", "audio", known, max_audio_bytes),
    }


def sanitize_filename(raw: str | None, default: str) -> str:
    """A display-safe base name: no directories, control/format characters or excess length."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp"))
    name = name.strip()
    if name in ("", ".", ".."):
        return default
    if len(name) > MAX_DISPLAY_NAME_CHARS:
        stem, ext = os.path.splitext(name)
        ext = ext if len(ext) <= 16 else ""
        name = stem[: MAX_DISPLAY_NAME_CHARS - len(ext)] + ext
    return name


def human_size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MB"
    if n >= MiB:
        return f"{n / MiB:.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n} bytes"
