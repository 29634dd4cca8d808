"""Job files in the local data directory (the embedded default): ``<data_dir>/jobs/<job_id>/``.

Here the storage and the pipeline's scratch directory are the same place, so ``put`` and
``fetch`` of a file that is already there do nothing. With several replicas this works
only when the data directory is one shared filesystem (a ReadWriteMany volume).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Collection, Container, Iterator
from datetime import datetime, timezone
from pathlib import Path

from lipsync_runner.storage.job_files import JobFiles

CHUNK = 1 << 20


class LocalObject:
    def __init__(self, path: Path) -> None:
        st = path.stat()
        self.local_path: Path | None = path
        self.size = int(st.st_size)
        self.etag: str | None = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        self.last_modified: datetime | None = datetime.fromtimestamp(st.st_mtime, timezone.utc)

    def iter_range(self, start: int, stop: int) -> Iterator[bytes]:
        assert self.local_path is not None
        with self.local_path.open("rb") as f:
            f.seek(start)
            left = stop - start
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def redirect_url(self, filename: str, disposition: str = "attachment",
                     media_type: str | None = None) -> str | None:
        return None


class LocalStorage:
    is_local = True

    def __init__(self, files: JobFiles) -> None:
        self.files = files
        self.description = f"local directory {files.root}"

    def put(self, job_id: str, name: str, src: Path) -> None:
        dest = self.files.path(job_id, name)
        if Path(src).resolve() == dest.resolve():
            return  # already in place (the upload or the output was written here)
        dest.parent.mkdir(exist_ok=True)
        tmp = dest.with_name(f".{name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def fetch(self, job_id: str, name: str, dest: Path) -> None:
        src = self.files.path(job_id, name)
        if src.resolve() == Path(dest).resolve():
            if not src.is_file():
                raise FileNotFoundError(name)
            return
        tmp = Path(dest).with_name(f".{Path(dest).name}.{secrets.token_hex(4)}.tmp")  # two readers may fetch at once
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def exists(self, job_id: str, name: str) -> bool:
        return self.files.path(job_id, name).is_file()

    def open(self, job_id: str, name: str) -> LocalObject:
        return LocalObject(self.files.path(job_id, name))

    def delete(self, job_id: str) -> None:
        self.files.remove(job_id)

    def sweep_orphans(self, known_ids: Container[str], active_ids: Collection[str], min_age_s: float) -> int:
        removed = 0
        for path in self.files.orphans(known_ids, active_ids, min_age_s=min_age_s):
            self.files.remove_orphan(path)
            removed += 1
        return removed

    def close(self) -> None:
        pass
