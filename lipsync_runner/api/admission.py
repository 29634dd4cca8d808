"""The one admission path of a lip-sync job, for both API surfaces.

    ready? (503) -> upload slot for this client (429) -> job slot: queue and disk (429, 507)
    -> receive the inputs into the job's directory (streamed; 400, 408, 413, 507)
    -> job parameters from JobParams (400) -> the inputs by content (400, 413)
    -> submit (queued) -> optionally wait -> the response body

The REST route `POST /api/lip-sync/generate` streams its multipart body through here, and
so does BentoML's `POST /generate` (serving/bentoml_compat.py routes it to the REST route
before BentoML would buffer the upload). A `generate` called in process hands over files
that are already on disk (`admit_files`). Everything after "receive" is the same code, so
the surfaces cannot drift: same checks, same errors, same bodies.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.concurrency import run_in_threadpool

from ..errors import InvalidInputError, LipSyncError, QueueFullError
from ..jobs.records import JobRecord, JobStatus
from ..media import AudioInfo, VideoInfo
from ..params import JobParams, parse_fields
from ..scratch import ScratchLedger
from .limits import ApiLimits
from .schemas import GenerateAccepted, GenerateResult, download_name
from .thumbnails import THUMBNAIL_NAME, THUMBNAIL_WIDTH, write_thumbnail
from .uploads import SavedFile, UploadGuard, is_multipart, receive_multipart
from .validation import validate_media

if TYPE_CHECKING:
    from .operations import Manager

log = logging.getLogger(__name__)

VIDEO_FIELD, AUDIO_FIELD = "video", "audio"


@dataclass
class Response:
    """A generate answer, the same for both surfaces."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]


class UploadSlots:
    """Uploads in progress, bounded per client and in all (429 beyond).

    A slow upload holds its slot only as long as the upload guard lets it (idle timeout,
    minimum rate), and one client's uploads can never take every slot: a hundred slow
    connections from one client get 429s for that client, everyone else still gets in.
    """

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._by_client: Counter[str] = Counter()

    @contextmanager
    def hold(self, client: str) -> Iterator[None]:
        # one event loop: no await between the check and the increment, so no lock is needed
        if self._by_client[client] >= self.per_client:
            raise QueueFullError(f"too many uploads in progress from this client (at most {self.per_client} at "
                                 "once); wait for one to finish", retry_after_s=10)
        if sum(self._by_client.values()) >= self.total:
            raise QueueFullError(f"the server is receiving {self.total} uploads already; try again shortly",
                                 retry_after_s=10)
        self._by_client[client] += 1
        try:
            yield
        finally:
            self._by_client[client] -= 1
            if self._by_client[client] <= 0:
                del self._by_client[client]


class Admission:
    def __init__(self, get_manager: Callable[[], Manager], limits: ApiLimits, *,
                 ensure_ready: Callable[[], Awaitable[None]] | None = None,
                 status_url: Callable[[str], str], download_url: Callable[[str], str],
                 scratch: ScratchLedger | None = None) -> None:
        self.get_manager = get_manager
        self.scratch = scratch  # the data directory's scratch reservations (507 when a job cannot fit)
        self.limits = limits
        self.ensure_ready = ensure_ready
        self.status_url = status_url
        self.download_url = download_url
        self.slots = UploadSlots(limits.max_uploads_per_client, limits.max_concurrent_uploads)
        self.defaults = {"bbox_shift": limits.bbox_shift}  # the deployment's LIP_SYNC_BBOX_SHIFT

    # ------------------------------------------------------------------ the two entries

    async def admit_stream(self, stream: AsyncIterator[bytes], content_type: str | None, *, owner: str | None,
                           client: str, wait: bool | None = None) -> Response:
        """A multipart/form-data body: `video`, `audio` files and the job parameters as fields."""
        if not is_multipart(content_type):  # before any slot is taken or byte read
            raise InvalidInputError("Expected a multipart/form-data request with 'video' and 'audio' files")

        async def receive(job_dir: Path, guard: UploadGuard) -> tuple[dict[str, SavedFile], dict[str, str]]:
            upload = await receive_multipart(stream, content_type, job_dir, guard=guard,
                                             text_fields=_TEXT_FIELDS)
            return upload.files, upload.fields

        return await self._admit(receive, owner=owner, client=client, wait=wait)

    async def admit_files(self, video: Path, audio: Path, fields: Mapping[str, Any], *, owner: str | None,
                          video_name: str | None = None, audio_name: str | None = None,
                          wait: bool | None = None) -> Response:
        """Files already on disk (a `generate` called in process)."""
        async def receive(job_dir: Path, guard: UploadGuard) -> tuple[dict[str, SavedFile], dict[str, Any]]:
            saved = {}
            for field, path, name in ((VIDEO_FIELD, video, video_name), (AUDIO_FIELD, audio, audio_name)):
                file = guard.saved_file(field, name or path.name)
                size = path.stat().st_size
                guard.check_size(field, size)
                await run_in_threadpool(shutil.copyfile, path, job_dir / file.file_name)
                file.size = size
                saved[field] = file
            return saved, dict(fields)

        return await self._admit(receive, owner=owner, client=owner or "local", wait=wait)

    # ------------------------------------------------------------------ the path

    async def _admit(self, receive, *, owner: str | None, client: str, wait: bool | None) -> Response:
        if self.ensure_ready is not None:
            await self.ensure_ready()  # 503 before anything is stored or read
        manager = self.get_manager()
        with self.slots.hold(client):
            job_id, job_dir = await run_in_threadpool(manager.new_upload)  # 429 / 507 before the body
            job_dir = Path(job_dir)
            files: dict[str, SavedFile] = {}
            try:
                guard = UploadGuard(self.limits, check_space=manager.check_free_space)
                files, fields = await receive(job_dir, guard)
                wait_flag = wait if wait is not None else _parse_bool(fields.get("wait"), "wait")
                params = parse_fields({k: v for k, v in fields.items() if k != "wait"}, self.defaults)
                video, audio = files[VIDEO_FIELD], files[AUDIO_FIELD]
                # ffmpeg subprocesses: off the event loop
                video_info, audio_info = await anyio.to_thread.run_sync(lambda: validate_media(
                    job_dir / video.file_name, job_dir / audio.file_name, self.limits, self.scratch, params=params))
                await anyio.to_thread.run_sync(write_thumbnail, job_dir / video.file_name, job_dir / THUMBNAIL_NAME,
                                               THUMBNAIL_WIDTH, video_info.demuxer)
                record = await run_in_threadpool(lambda: manager.submit(
                    job_id, video_file=video.file_name, audio_file=audio.file_name,
                    video_filename=video.display_name, audio_filename=audio.display_name,
                    params=params, owner=owner, media=media_summary(video_info, audio_info)))
            except BaseException as exc:
                with anyio.CancelScope(shield=True):
                    try:
                        await run_in_threadpool(manager.discard_upload, job_id)
                    except Exception:
                        log.exception("discarding upload %s failed", job_id)
                if isinstance(exc, LipSyncError):
                    _scrub(exc, job_dir, files)
                raise
        if wait_flag:
            return await self._wait(manager, record, owner)
        return self.accepted(record)

    async def _wait(self, manager: Manager, record: JobRecord, owner: str | None) -> Response:
        try:
            record = await manager.wait_async(record.job_id, timeout=self.limits.wait_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            record = await run_in_threadpool(manager.get, record.job_id, owner)
        if not record.status.finished:
            return self.accepted(record)  # the wait ran out first: like an asynchronous submit
        job_id = record.job_id
        ok = record.status == JobStatus.completed
        error = None if ok else (record.error or f"Lip sync job {record.status.value}")
        result = GenerateResult(
            success=ok, job_id=job_id, status=record.status,
            message="Lip sync completed successfully" if ok else error,
            output_path=download_name(job_id) if ok else None,
            download_url=self.download_url(job_id) if ok else None,
            status_url=self.status_url(job_id), error=error)
        return Response(200, result.model_dump(mode="json"), {})

    def accepted(self, record: JobRecord) -> Response:
        job_id = record.job_id
        accepted = GenerateAccepted(
            job_id=job_id, status=record.status,
            message="Lip sync job queued" if record.status == JobStatus.queued else "Lip sync job running",
            status_url=self.status_url(job_id), download_url=self.download_url(job_id))
        return Response(202, accepted.model_dump(mode="json"), {"Location": self.status_url(job_id)})


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
#: Form fields collected as text: the job parameters, and the request's own options.
_TEXT_FIELDS = frozenset({*JobParams.model_fields, "wait"})


def _parse_bool(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    v = str(value).strip().strip('"').lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidInputError(f"Invalid {name}: expected true or false, got {str(value)[:20]!r}")


def parse_wait(value: str | None) -> bool | None:
    """The `wait` query parameter (None: not given, the form field may say)."""
    return None if value is None else _parse_bool(value, "wait")


def media_summary(video: VideoInfo, audio: AudioInfo) -> dict[str, Any]:
    """What the job list shows of its inputs, and what the job need not probe again."""
    return {
        "video": {"duration_s": round(video.duration, 3), "fps": f"{video.fps.numerator}/{video.fps.denominator}",
                  "width": video.width, "height": video.height, "frames": video.frame_count_estimate},
        "audio": {"duration_s": round(audio.duration, 3)},
    }


def _scrub(exc: LipSyncError, job_dir: Path, files: dict[str, SavedFile]) -> None:
    """Name files as the user knows them and drop any server path from a message."""
    msg = exc.message
    for root in {str(job_dir), str(job_dir.resolve())}:
        msg = msg.replace(root + "/", "").replace(root, "")
    for saved in files.values():
        msg = msg.replace(saved.file_name, saved.display_name)
    exc.message = msg
    exc.args = (msg,)
