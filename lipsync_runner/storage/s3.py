"""Job files in an S3-compatible bucket (boto3): ``s3://bucket/prefix/jobs/<job_id>/<name>``.

Only the S3 API is used (PUT, multipart upload, GET with Range, HEAD, list, delete,
presign), so AWS S3, MinIO, Ceph or GCS's S3 endpoint all work. Files are streamed both
ways: uploads are multipart from the local file (``upload_file`` with a TransferConfig,
a few parts in memory at a time), downloads go to disk or out in chunks; no whole file is
ever held in memory. An object appears only when its upload completed, so a stored file is
never partial.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Collection, Container, Iterator
from datetime import datetime
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from lipsync_runner.errors import LipSyncError
from lipsync_runner.storage.job_files import is_plain_name
from lipsync_runner.params import is_job_id
from lipsync_runner.storage.base import content_disposition

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PART = 16 << 20  # multipart part size (S3's minimum is 5 MiB)
CONTENT_TYPES = {".mp4": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska",
                 ".avi": "video/x-msvideo", ".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4",
                 ".aac": "audio/aac", ".ogg": "audio/ogg", ".jpg": "image/jpeg"}


class StorageUnavailableError(LipSyncError):
    """The bucket cannot be reached (503: retry later)."""

    http_status = 503


def _not_found(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Object:
    def __init__(self, storage: S3Storage, key: str, head: dict) -> None:
        self._s = storage
        self.key = key
        self.size = int(head["ContentLength"])
        self.etag: str | None = head.get("ETag")
        self.last_modified: datetime | None = head.get("LastModified")
        self.local_path: Path | None = None

    def iter_range(self, start: int, stop: int) -> Iterator[bytes]:
        if stop <= start:
            return
        # If-Match: the object replaced meanwhile (a re-run of the job) fails the read instead of
        # splicing two versions into one download.
        extra = {"IfMatch": self.etag} if self.etag else {}
        body = self._s.client.get_object(Bucket=self._s.bucket, Key=self.key, Range=f"bytes={start}-{stop - 1}",
                                         **extra)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def redirect_url(self, filename: str, disposition: str = "attachment",
                     media_type: str | None = None) -> str | None:
        if not self._s.presigned_downloads:
            return None
        # the type the service decided (from the probed content); the name's only for an older caller
        content_type = media_type or CONTENT_TYPES.get(Path(filename).suffix.lower(), "application/octet-stream")
        return self._s.client.generate_presigned_url(
            "get_object", ExpiresIn=self._s.presign_expiry_s,
            Params={"Bucket": self._s.bucket, "Key": self.key,
                    "ResponseContentDisposition": content_disposition(disposition, filename),
                    "ResponseContentType": content_type})


class S3Storage:
    is_local = False

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 presigned_downloads: bool = False, presign_expiry_s: int = 3600, client=None,
                 part_size: int = PART, max_concurrency: int = 4) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.presigned_downloads = bool(presigned_downloads)
        self.presign_expiry_s = int(presign_expiry_s)
        self.description = f"s3://{bucket}/{self.prefix}" + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                        # S3-compatible servers (MinIO, moto, Ceph) expect path-style addressing
                        s3={"addressing_style": "path" if endpoint_url else "auto"})
        # a client (not a session) is thread-safe: one for every worker and request
        self._owns_client = client is None
        self.client = client or boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                                               config=config)
        # at most max_concurrency parts of part_size bytes in memory per upload, whatever the file's size
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=max_concurrency, use_threads=True)
        try:
            self.client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as e:
            raise StorageUnavailableError(f"cannot use the bucket {self.description}: {e}") from e

    # -- keys ------------------------------------------------------------------------------

    def _job_prefix(self, job_id: str) -> str:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return f"{self.prefix}jobs/{job_id}/"

    def key(self, job_id: str, name: str) -> str:
        if not is_plain_name(name):
            raise ValueError(f"not a plain file name: {name!r}")
        return self._job_prefix(job_id) + name

    # -- files -----------------------------------------------------------------------------

    def put(self, job_id: str, name: str, src: Path) -> None:
        content_type = CONTENT_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")
        try:
            self.client.upload_file(str(src), self.bucket, self.key(job_id, name), Config=self.transfer,
                                    ExtraArgs={"ContentType": content_type})
        except (BotoCoreError, ClientError, S3UploadFailedError) as e:
            log.warning("storing %s of job %s in %s failed: %s", name, job_id, self.description, e)
            raise StorageUnavailableError("the file storage is unavailable; try again shortly") from e

    def fetch(self, job_id: str, name: str, dest: Path) -> None:
        """One streamed GET into a temp file, renamed onto ``dest`` when complete."""
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")  # two readers may fetch at once
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, name))["Body"]
            try:
                with tmp.open("wb") as f:
                    for chunk in body.iter_chunks(CHUNK):
                        f.write(chunk)
            finally:
                body.close()
        except ClientError as e:
            tmp.unlink(missing_ok=True)
            if _not_found(e):
                raise FileNotFoundError(f"{name} of job {job_id} is not in {self.description}") from None
            raise StorageUnavailableError("the file storage is unavailable; try again shortly") from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _not_found(e):
                return None
            raise

    def exists(self, job_id: str, name: str) -> bool:
        return self._head(self.key(job_id, name)) is not None

    def open(self, job_id: str, name: str) -> S3Object:
        key = self.key(job_id, name)
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(name)
        return S3Object(self, key, head)

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            batch = keys[i:i + 1000]
            answer = self.client.delete_objects(Bucket=self.bucket,
                                                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if answer.get("Errors"):
                raise RuntimeError(f"could not delete {len(answer['Errors'])} object(s) from {self.description}: "
                                   f"{answer['Errors'][0].get('Message')}")

    def _list(self, prefix: str) -> Iterator[dict]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def delete(self, job_id: str) -> None:
        self._delete_keys([obj["Key"] for obj in self._list(self._job_prefix(job_id))])

    def job_keys(self) -> dict[str, list[dict]]:
        """Every stored object under the jobs prefix, by job id (for orphan sweeps and tests)."""
        found: dict[str, list[dict]] = {}
        root = f"{self.prefix}jobs/"
        for obj in self._list(root):
            job_id = obj["Key"][len(root):].split("/", 1)[0]
            found.setdefault(job_id, []).append(obj)
        return found

    def sweep_orphans(self, known_ids: Container[str], active_ids: Collection[str], min_age_s: float) -> int:
        """Objects of jobs without a record, and multipart uploads a crash left unfinished."""
        cutoff = time.time() - min_age_s
        removed = 0
        for job_id, objects in self.job_keys().items():
            if job_id in active_ids or job_id in known_ids:
                continue
            if max(o["LastModified"].timestamp() for o in objects) > cutoff:
                continue  # a submit may be between storing its inputs and recording the job
            self._delete_keys([o["Key"] for o in objects])
            log.info("removed %d orphaned object(s) of job %s from %s", len(objects), job_id, self.description)
            removed += 1
        # Parts of an upload that never completed are invisible but billed: abort them.
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}jobs/"):
            for upload in page.get("Uploads", []):
                job_id = upload["Key"][len(f"{self.prefix}jobs/"):].split("/", 1)[0]
                if job_id not in active_ids and upload["Initiated"].timestamp() <= cutoff:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
                    removed += 1
        return removed

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
