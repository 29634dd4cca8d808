"""URL inputs as files: the *reference* that stands in the job's directory for a URL input.

A job given ``video_url`` (or ``audio_url``) is admitted without that file. In its place
admission writes a small reference file (``input_video.url.json``), so that the job's
inputs are still files in its directory: the job manager checks, stores, recovers and (with
object storage) stages them like any upload, and needs to know nothing about URLs. The URL
itself is the job parameter (``JobParams.video_url``), the one place it is kept; the
reference holds only what may be shown (the URL without query or credentials) and, once the
worker has fetched it (inputs/sources.py), the name of the fetched file, for playback.

A job by ``avatar_id`` has an *avatar reference* instead of a video (``input_video.avatar.json``,
naming the avatar): the worker uses the avatar's stored video (api/avatars.py).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lipsync_runner.inputs.netguard import redact_url

REFERENCE_SUFFIX = ".url.json"
AVATAR_REFERENCE = "input_video.avatar.json"
INPUT_FIELDS = ("video", "audio")


def reference_name(field: str) -> str:
    return f"input_{field}{REFERENCE_SUFFIX}"


def is_reference(file_name: str) -> bool:
    return file_name.endswith(REFERENCE_SUFFIX)


def url_display_name(url: str, field: str) -> str:
    """What the job list shows for a URL input: the last path segment, sanitised (never the query)."""
    from lipsync_runner.inputs.files import sanitize_filename  # here: the API package imports this module while it loads

    try:
        path = urlsplit(url).path
    except ValueError:
        path = ""
    return sanitize_filename(posixpath.basename(unquote(path)), f"{field}_url")


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, sort_keys=True))
    os.replace(tmp, path)


def write_reference(job_dir: Path, field: str, url: str) -> str:
    """The reference file standing for a URL input; its name in the job's directory."""
    name = reference_name(field)
    write_json(job_dir / name, {"input": field, "source": redact_url(url)})
    return name


def read_reference(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def fetched_file(job_dir: Path, reference: str) -> str | None:
    """The fetched file a reference names, once the worker has fetched it (for playback); None before.

    Only a name: the file is read through the job's storage (with a bucket, the reference may be a
    local copy of the stored one, without the file beside it), which says whether it is there.
    """
    name = read_reference(job_dir / reference).get("file")
    if not isinstance(name, str) or "/" in name or not name.startswith("input_") or is_reference(name):
        return None
    return name


def is_avatar_reference(file_name: str | None) -> bool:
    return file_name == AVATAR_REFERENCE


def write_avatar_reference(job_dir: Path, avatar_id: str) -> str:
    """The reference standing for the video of a job by ``avatar_id``; its name in the job's directory."""
    write_json(job_dir / AVATAR_REFERENCE, {"input": "video", "avatar_id": avatar_id})
    return AVATAR_REFERENCE
