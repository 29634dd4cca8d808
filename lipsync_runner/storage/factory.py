"""The job-file storage a deployment asks for (``LIP_SYNC_STORAGE_URL``): the data directory, or a bucket."""

from __future__ import annotations

from urllib.parse import urlparse

from lipsync_runner.storage.base import JobStorage
from lipsync_runner.storage.job_files import JobFiles
from lipsync_runner.storage.local import LocalStorage


def open_storage(url: str | None, files: JobFiles, *, endpoint_url: str | None = None, region: str | None = None,
                 presigned_downloads: bool = False, presign_expiry_s: int = 3600) -> JobStorage:
    """The local data directory when ``url`` is empty, else ``s3://bucket[/prefix]``.

    Credentials and region come from the standard AWS sources (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, a mounted profile, an IAM role ...);
    ``endpoint_url`` points at an S3-compatible store (MinIO, GCS's S3 endpoint, ...).
    """
    if not url:
        return LocalStorage(files)
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"unsupported storage URL {url!r}: expected s3://bucket[/prefix] (or nothing, for the "
                         "local data directory)")
    from lipsync_runner.storage.s3 import S3Storage  # boto3 only when asked for

    return S3Storage(parsed.netloc, parsed.path.strip("/"), endpoint_url=endpoint_url, region=region,
                     presigned_downloads=presigned_downloads, presign_expiry_s=presign_expiry_s)
