"""Job files in an S3 bucket (moto's server on the loopback, through the S3 API only), and the
download response that serves any stored object with HTTP Range support."""

from __future__ import annotations

import hashlib
import os
import time
import tracemalloc
import uuid

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from lipsync_runner.jobs import JobFiles, new_job_id
from lipsync_runner.storage import LocalStorage, object_response, parse_range
from lipsync_runner.storage.factory import open_storage
from lipsync_runner.storage.http import RangeNotSatisfiable
from lipsync_runner.storage.s3 import S3Storage, StorageUnavailableError

MiB = 2**20


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.create_bucket()


@pytest.fixture
def storage(s3, bucket) -> S3Storage:
    return S3Storage(bucket, f"p-{uuid.uuid4().hex[:8]}/x", endpoint_url=s3.endpoint_url, client=s3.client())


def test_open_storage_chooses_by_url(tmp_path, s3, bucket):
    files = JobFiles(tmp_path)
    assert isinstance(open_storage(None, files), LocalStorage) and isinstance(open_storage("", files), LocalStorage)
    chosen = open_storage(f"s3://{bucket}/some/prefix/", files, endpoint_url=s3.endpoint_url)
    assert isinstance(chosen, S3Storage) and (chosen.bucket, chosen.prefix) == (bucket, "some/prefix/")
    chosen.close()
    for bad in ("gs://bucket", "s3://", "/data/jobs", "bucket/prefix"):
        with pytest.raises(ValueError, match="storage URL"):
            open_storage(bad, files)


def test_a_missing_bucket_is_a_clear_503_at_start(s3):
    with pytest.raises(StorageUnavailableError, match="no-such-bucket") as e:
        S3Storage("no-such-bucket", endpoint_url=s3.endpoint_url, client=s3.client())
    assert e.value.http_status == 503


def test_put_fetch_open_delete(storage, s3, tmp_path):
    job = new_job_id()
    src = tmp_path / "in.mp4"
    src.write_bytes(b"0123456789" * 100)
    storage.put(job, "input_video.mp4", src)
    assert storage.exists(job, "input_video.mp4") and not storage.exists(job, "output.mp4")
    key = f"{storage.prefix}jobs/{job}/input_video.mp4"
    assert s3.client().head_object(Bucket=storage.bucket, Key=key)["ContentType"] == "video/mp4"

    dest = tmp_path / "scratch" / "input_video.mp4"
    dest.parent.mkdir()
    storage.fetch(job, "input_video.mp4", dest)
    assert dest.read_bytes() == src.read_bytes() and list(dest.parent.iterdir()) == [dest]  # no temp left
    with pytest.raises(FileNotFoundError):
        storage.fetch(job, "output.mp4", tmp_path / "scratch" / "output.mp4")
    assert list(dest.parent.iterdir()) == [dest]

    obj = storage.open(job, "input_video.mp4")
    assert obj.size == 1000 and obj.local_path is None and obj.etag
    assert b"".join(obj.iter_range(995, 1000)) == b"56789"
    with pytest.raises(FileNotFoundError):
        storage.open(job, "output.mp4")
    for bad_name in ("../x", ".hidden", "a/b"):
        with pytest.raises(ValueError):
            storage.put(job, bad_name, src)
    with pytest.raises(ValueError):
        storage.exists("../" + job, "input_video.mp4")

    storage.delete(job)
    storage.delete(job)  # nothing left: fine
    assert s3.keys(storage.bucket, f"{storage.prefix}jobs/{job}/") == []


def test_a_large_file_streams_both_ways_with_bounded_memory(s3, bucket, tmp_path):
    """Multipart upload from the file and a chunked download to disk: Python's peak allocation stays
    near (parts in flight x part size), far below the file's size."""
    storage = S3Storage(bucket, "big", endpoint_url=s3.endpoint_url, client=s3.client(),
                        part_size=5 * MiB, max_concurrency=2)
    job = new_job_id()
    src = tmp_path / "big.mp4"
    with src.open("wb") as f:
        for i in range(6):  # 30 MiB, not compressible
            f.write(os.urandom(5 * MiB))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()

    tracemalloc.start()
    try:
        storage.put(job, "input_video.mp4", src)
        _, up_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        storage.fetch(job, "input_video.mp4", tmp_path / "back.mp4")
        _, down_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    head = s3.client().head_object(Bucket=bucket, Key=f"big/jobs/{job}/input_video.mp4")
    assert head["ContentLength"] == 30 * MiB and head["ETag"].strip('"').endswith("-6")  # six parts
    assert hashlib.sha256((tmp_path / "back.mp4").read_bytes()).hexdigest() == digest
    assert up_peak < 16 * MiB, f"upload peak {up_peak / MiB:.1f} MiB for a 30 MiB file"
    assert down_peak < 8 * MiB, f"download peak {down_peak / MiB:.1f} MiB"


def test_sweep_removes_objects_without_a_job_and_unfinished_uploads(storage, s3, tmp_path):
    client = s3.client()
    known, active, orphan, young = (new_job_id() for _ in range(4))
    src = tmp_path / "f.mp4"
    src.write_bytes(b"x")
    for job in (known, active, orphan):
        storage.put(job, "input_video.mp4", src)
    stale = client.create_multipart_upload(Bucket=storage.bucket, Key=f"{storage.prefix}jobs/{known}/output.mp4")
    time.sleep(1.1)  # S3 times are to the second: make the above older than the grace below
    storage.put(young, "input_video.mp4", src)  # stored a moment ago: its submit may still be recording it

    removed = storage.sweep_orphans(known_ids={known}, active_ids={active}, min_age_s=1.0)
    assert removed == 2  # the orphan's objects, and the unfinished upload
    left = {k.split("/")[-2] for k in s3.keys(storage.bucket, storage.prefix)}
    assert left == {known, active, young}
    uploads = client.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix).get("Uploads", [])
    assert stale["UploadId"] not in {u["UploadId"] for u in uploads}


# ---------------------------------------------------------------------------------- HTTP ranges


@pytest.mark.parametrize("header, size, expected", [
    (None, 100, None),
    ("", 100, None),
    ("bytes=0-9", 100, (0, 10)),
    ("bytes=90-", 100, (90, 100)),
    ("bytes=-10", 100, (90, 100)),
    ("bytes=-1000", 100, (0, 100)),  # more than there is: all of it
    ("bytes=95-1000", 100, (95, 100)),
    ("BYTES = 5 - 6", 100, (5, 7)),
    ("bytes=0-1,5-6", 100, None),  # several ranges: the whole body (allowed by RFC 9110)
    ("items=0-1", 100, None),
    ("bytes=abc", 100, None),
    ("bytes=-", 100, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-200", "bytes=7-3", "bytes=-0",
                                    f"bytes={10**30}-"])
def test_parse_range_refuses_what_cannot_be_served(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def _download_app(storage, job: str, presigned: bool = False) -> TestClient:
    async def download(request: Request):
        return object_response(storage.open(job, "output.mp4"), "lip_sync_x.mp4",
                               range_header=request.headers.get("range"), allow_redirect=presigned)

    return TestClient(Starlette(routes=[Route("/d", download)]))


@pytest.fixture
def stored_output(storage, tmp_path) -> tuple[str, bytes]:
    job = new_job_id()
    body = bytes(range(256)) * 40  # 10240 bytes
    (tmp_path / "output.mp4").write_bytes(body)
    storage.put(job, "output.mp4", tmp_path / "output.mp4")
    return job, body


def test_a_bucket_object_streams_through_the_response_with_ranges(storage, stored_output):
    job, body = stored_output
    client = _download_app(storage, job)
    full = client.get("/d")
    assert full.status_code == 200 and full.content == body
    assert full.headers["content-length"] == str(len(body)) and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-type"] == "video/mp4"
    assert full.headers["content-disposition"] == 'attachment; filename="lip_sync_x.mp4"'
    assert full.headers["etag"] and full.headers["last-modified"].endswith("GMT")

    part = client.get("/d", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == body[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(body)}"
    tail = client.get("/d", headers={"Range": "bytes=-16"})
    assert tail.status_code == 206 and tail.content == body[-16:]
    bad = client.get("/d", headers={"Range": "bytes=99999-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(body)}"


def test_a_local_file_is_served_as_a_file_with_ranges(tmp_path):
    files = JobFiles(tmp_path)
    job = new_job_id()
    files.job_dir(job, create=True)
    files.output_path(job).write_bytes(b"abcdefghij")
    client = _download_app(LocalStorage(files), job)
    assert client.get("/d").content == b"abcdefghij"
    part = client.get("/d", headers={"Range": "bytes=2-4"})
    assert part.status_code == 206 and part.content == b"cde"


def test_presigned_downloads_redirect_to_the_bucket(s3, bucket, stored_output, storage):
    job, body = stored_output
    presigning = S3Storage(bucket, storage.prefix, endpoint_url=s3.endpoint_url, client=s3.client(),
                           presigned_downloads=True, presign_expiry_s=120)
    answer = _download_app(presigning, job, presigned=True).get("/d", follow_redirects=False)
    assert answer.status_code == 307
    location = answer.headers["location"]
    assert location.startswith(s3.endpoint_url) and "Signature" in location and "Expires" in location
    fetched = httpx.get(location)  # the client fetches from the bucket itself
    assert fetched.status_code == 200 and fetched.content == body
    assert 'filename="lip_sync_x.mp4"' in fetched.headers["content-disposition"]
    # the redirect is off unless the storage is set up for it
    assert _download_app(storage, job, presigned=True).get("/d", follow_redirects=False).status_code == 200


def test_a_presigned_redirect_carries_the_type_the_service_decided_not_the_names(s3, bucket, stored_output, storage):
    """The bucket answers the presigned URL with the probed type: a name ending in .html decides nothing."""
    job, _ = stored_output
    presigning = S3Storage(bucket, storage.prefix, endpoint_url=s3.endpoint_url, client=s3.client(),
                           presigned_downloads=True, presign_expiry_s=120)

    async def download(request: Request):
        return object_response(presigning.open(job, "output.mp4"), "clip.html", media_type="video/mp4")

    answer = TestClient(Starlette(routes=[Route("/d", download)])).get("/d", follow_redirects=False)
    assert answer.status_code == 307
    fetched = httpx.get(answer.headers["location"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "video/mp4"


def test_a_download_never_splices_two_versions_of_an_object(storage, stored_output, tmp_path):
    """The object is re-written (a re-run of the job) between two range reads: the read fails."""
    job, body = stored_output
    obj = storage.open(job, "output.mp4")
    assert b"".join(obj.iter_range(0, 10)) == body[:10]
    (tmp_path / "new.mp4").write_bytes(b"other content")
    storage.put(job, "output.mp4", tmp_path / "new.mp4")
    with pytest.raises(Exception, match="PreconditionFailed|pre-condition"):
        b"".join(obj.iter_range(10, 20))


# ----------------------------------------------------------------- a job's other files, kept in the bucket


def test_a_url_jobs_fetched_inputs_and_thumbnail_are_stored_with_it(s3, bucket, models_dir, model, tmp_path):
    """With a bucket the worker's scratch is dropped after the job: what it fetched (the inputs, the
    reference naming the fetched file) and the thumbnail it made are stored with the job first, so
    input playback and the thumbnail work afterwards, through any replica (the bucket, not this disk)."""
    import json

    from lipsync_runner.serving.core import ServiceCore
    from lipsync_runner.config import OutboundSettings, Settings
    from lipsync_runner.serving.runner import RunnerCore
    from lipsync_runner.config import ServiceSettings
    from lipsync_runner.config import RunnerSettings
    from lipsync_runner.media.samples import write_face_video, write_speech_like_audio

    from .loopback_http import LoopbackServer, Reply

    video = write_face_video(tmp_path / "face.mp4", seconds=0.4, fps=25, size=(320, 240)).read_bytes()
    audio = write_speech_like_audio(tmp_path / "fr.wav", seconds=0.4).read_bytes()
    runner = RunnerCore(RunnerSettings(device="cpu"), load=False)
    runner.model, runner.state = model, "ready"
    data, prefix = tmp_path / "data", f"url-job-{uuid.uuid4().hex[:8]}"
    core = ServiceCore(runner, Settings(
        service=ServiceSettings(data_dir=data, job_workers=1, free_space_floor_mb=0, chunk_frames=2, avatar_cache=False,
                                storage_url=f"s3://{bucket}/{prefix}", s3_endpoint_url=s3.endpoint_url),
        outbound=OutboundSettings(url_allowlist="127.0.0.1"),
        runner=RunnerSettings(device="cpu", models_dir=models_dir)))
    rest = core.rest_app
    core.start(None)
    try:
        with LoopbackServer() as files, TestClient(rest) as api:
            files.routes["/in/face.mp4"] = lambda req: Reply(200, {"Content-Type": "video/mp4"}, video)
            files.routes["/in/fr.wav"] = lambda req: Reply(200, {"Content-Type": "audio/wav"}, audio)
            asked = api.post("/generate", json={"video_url": files.url("/in/face.mp4"),
                                                "audio_url": files.url("/in/fr.wav"), "silence": "generate",
                                                "segments": json.dumps([{"start": 0.0, "end": 0.12}])})
            assert asked.status_code == 202, asked.text
            job_id = asked.json()["job_id"]
            deadline = time.monotonic() + 120
            while (status := api.get(f"/status/{job_id}").json())["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline, status
                time.sleep(0.1)
            assert status["status"] == "completed", status
            # the worker's scratch goes right after the job's final status is written: only the bucket has them
            scratch, gone_by = data / "jobs" / job_id, time.monotonic() + 30
            while scratch.exists():
                assert time.monotonic() < gone_by, sorted(p.name for p in scratch.iterdir())
                time.sleep(0.05)
            stored = {k.rsplit("/", 1)[1] for k in s3.keys(bucket, f"{prefix}/jobs/{job_id}/")}
            assert {"input_video.mp4", "input_audio.wav", "input_video.url.json", "input_audio.url.json",
                    "thumbnail.jpg", "output.mp4"} <= stored, stored
            played = api.get(f"/jobs/{job_id}/inputs/video")
            assert played.status_code == 200 and played.content == video
            assert api.get(f"/jobs/{job_id}/inputs/audio").content == audio
            thumbnail = api.get(f"/jobs/{job_id}/thumbnail.jpg")
            assert thumbnail.status_code == 200 and thumbnail.content[:3] == b"\xff\xd8\xff"  # a JPEG
            assert api.get(f"/download/{job_id}").status_code == 200
    finally:
        core.stop()
