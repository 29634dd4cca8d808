"""Content hashes of files: the avatar cache keys a video by its bytes, content credentials name their
ingredients by theirs."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 4 * 2**20) -> str:
    """Hex SHA-256 of a file, read in chunks (inputs can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
