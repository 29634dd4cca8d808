"""What each job endpoint does, once, for both API surfaces.

The REST routes (`rest.py`) and BentoML's endpoints (service.py) are thin wrappers over
`JobOperations`: they parse their own request shape, call the same method, and answer
with the same body (or the same file response), so the two surfaces cannot drift.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from lipsync_runner.api.admission import Admission
from lipsync_runner.api.preview import PreviewAnswer, Previewer, run_preview
from lipsync_runner.config import ApiLimits
from lipsync_runner.errors import (InvalidInputError, JobNotFinishedError, JobNotFoundError, ModelsNotReadyError,
                                   NoCredentialsError)
from lipsync_runner.inputs.reference import fetched_file, is_avatar_reference, is_reference, read_reference
from lipsync_runner.jobs import avatars
from lipsync_runner.jobs.front import Manager
from lipsync_runner.jobs.records import JobKind, JobRecord, JobStatus
from lipsync_runner.jobs.schemas import (
    AvatarDeleted,
    AvatarListResponse,
    AvatarStatusResponse,
    CleanupResponse,
    JobListResponse,
    JobStatusResponse,
    JobSummary,
    download_name,
)
from lipsync_runner.media import hls
from lipsync_runner.media.thumbnails import THUMBNAIL_NAME
from lipsync_runner.params import OUTPUT_MEDIA_TYPES, JobParams, is_job_id
from lipsync_runner.pipeline.scratch_disk import ScratchLedger
from lipsync_runner.storage import object_response
from lipsync_runner.storage.job_files import CREDENTIALS_NAME

if TYPE_CHECKING:
    from lipsync_runner.integration.services import Integration

MAX_LIST_LIMIT = 1000
INPUT_KINDS = ("video", "audio")
# The media type of an input, by the demuxer its probe settled on (inputs/validation.py's media
# summary): the content decides, never the user's file name (clip.html may well be an MP4).
INPUT_MEDIA_TYPES = {"mov": "video/mp4", "matroska": "video/webm", "avi": "video/x-msvideo", "mp3": "audio/mpeg",
                     "wav": "audio/wav", "aac": "audio/aac", "ogg": "audio/ogg"}
UNKNOWN_MEDIA_TYPE = "application/octet-stream"  # not probed (yet): a download, never shown


def checked_id(job_id: str) -> str:
    """A canonical job id, or 404 before anything (store, filesystem) is touched."""
    if not is_job_id(job_id):
        raise JobNotFoundError("Job not found")
    return job_id


class JobOperations:
    def __init__(self, manager: Manager, limits: ApiLimits, *,
                 ensure_ready: Callable[[], Awaitable[None]] | None = None,
                 integration: Integration | None = None, scratch: ScratchLedger | None = None,
                 avatars_enabled: bool = True, avatar_room: Callable[[str | None], None] | None = None,
                 defaults: dict[str, Any] | None = None, previewer: Previewer | None = None) -> None:
        self.manager = manager
        self.previewer = previewer  # POST /preview (None: this server renders no previews, 503)
        self.limits = limits
        self.prefix = limits.url_prefix.rstrip("/")
        self.integration = integration  # webhooks, Idempotency-Key, queue ETA, usage (integration/services.py)
        self.avatars_enabled = avatars_enabled  # False without an avatar cache: avatars are refused (400)
        self.admission = Admission(manager, limits, defaults=defaults, ensure_ready=ensure_ready,
                                   status_url=self.status_url, download_url=self.download_url,
                                   integration=integration, scratch=scratch, avatar_url=self.avatar_url,
                                   avatars_enabled=avatars_enabled, avatar_room=avatar_room)

    async def preview(self, stream: AsyncIterator[bytes], content_type: str | None, *, owner: str | None,
                      client: str, accept: str | None) -> PreviewAnswer:
        """POST /preview (api/preview.py): generate's request, a short stretch rendered at once."""
        if self.previewer is None:
            raise ModelsNotReadyError("this server renders no previews")
        return await run_preview(self.admission, self.previewer, stream, content_type, owner=owner, client=client,
                                 accept=accept)

    # ------------------------------------------------------------------ urls

    def status_url(self, job_id: str) -> str:
        return f"{self.prefix}/status/{job_id}"

    def download_url(self, job_id: str) -> str:
        return f"{self.prefix}/download/{job_id}"

    def avatar_url(self, avatar_id: str) -> str:
        return f"{self.prefix}/avatars/{avatar_id}"

    # ------------------------------------------------------------------ bodies

    def status_body(self, record: JobRecord) -> dict[str, Any]:
        """GET /status's body, the one each webhook carries (integration builds it: with the queue
        position, the ETA and the deliveries, so call it off the loop); without integration, the record's."""
        if self.integration is not None:
            return self.integration.status_body(record)
        return JobStatusResponse.from_record(record, self.download_url(record.job_id)).model_dump(mode="json")

    def _job(self, job_id: str, owner: str | None) -> JobRecord:
        """The caller's job; 404 for an avatar's id too (avatars have their own routes)."""
        record = self.manager.get(checked_id(job_id), owner)
        if record.kind is not JobKind.job:
            raise JobNotFoundError("Job not found")
        return record

    async def status(self, job_id: str, owner: str | None) -> dict[str, Any]:
        return await run_in_threadpool(lambda: self.status_body(self._job(job_id, owner)))

    async def cancel(self, job_id: str, owner: str | None) -> dict[str, Any]:
        def cancel() -> dict[str, Any]:
            self._job(job_id, owner)
            return self.status_body(self.manager.cancel(job_id, owner))

        return await run_in_threadpool(cancel)

    async def cleanup(self, job_id: str, owner: str | None) -> dict[str, Any]:
        def cleanup() -> None:
            self._job(job_id, owner)
            self.manager.cleanup(job_id, owner)

        await run_in_threadpool(cleanup)
        return CleanupResponse(job_id=job_id).model_dump(mode="json")

    # ------------------------------------------------------------------ avatars

    def avatar_body(self, record: JobRecord) -> dict[str, Any]:
        extras = self.integration.status_extras(record) if self.integration is not None else {}
        return AvatarStatusResponse.from_record(record, self.prefix, **extras).model_dump(mode="json")

    def _avatar(self, avatar_id: str, owner: str | None) -> JobRecord:
        if not self.avatars_enabled:
            raise InvalidInputError(avatars.DISABLED)
        return avatars.find_avatar(self.manager, avatar_id, owner)

    async def avatar(self, avatar_id: str, owner: str | None) -> dict[str, Any]:
        return await run_in_threadpool(lambda: self.avatar_body(self._avatar(avatar_id, owner)))

    async def avatars(self, owner: str | None, limit: int = 100) -> dict[str, Any]:
        limit = max(1, min(int(limit), MAX_LIST_LIMIT))

        def listed() -> dict[str, Any]:
            records = self.manager.list(owner=owner, limit=limit, kind=JobKind.avatar)
            bodies = [AvatarStatusResponse.from_record(r, self.prefix) for r in records]
            return AvatarListResponse(total=len(bodies), avatars=bodies).model_dump(mode="json")

        return await run_in_threadpool(listed)

    async def delete_avatar(self, avatar_id: str, owner: str | None) -> dict[str, Any]:
        """Remove the avatar (cancelled if still being prepared), its video and its cache entry."""
        def delete() -> None:
            self._avatar(avatar_id, owner)
            self.manager.cleanup(avatar_id, owner)

        await run_in_threadpool(delete)
        return AvatarDeleted(avatar_id=avatar_id).model_dump(mode="json")

    async def jobs(self, owner: str | None, limit: int = 100) -> dict[str, Any]:
        limit = max(1, min(int(limit), MAX_LIST_LIMIT))
        records = await run_in_threadpool(lambda: self.manager.list(owner=owner, limit=limit))
        return JobListResponse(total=len(records),
                               jobs=[JobSummary.from_record(r, self.prefix) for r in records]).model_dump(mode="json")

    @staticmethod
    def params_schema() -> dict[str, Any]:
        return JobParams.model_json_schema()

    async def usage(self, owner: str | None, since: date | None = None, until: date | None = None) -> dict[str, Any]:
        """The caller's own usage (``owner`` comes from its token, never from the request) by UTC day."""
        if self.integration is None:
            raise JobNotFoundError("Usage is not recorded by this server")
        return await run_in_threadpool(self.integration.usage, owner, since, until)

    # ------------------------------------------------------------------ files

    # Each is streamed from the job storage (a local file, or a bucket through this replica) or,
    # with LIP_SYNC_PRESIGNED_DOWNLOADS, a redirect to the bucket; `range_header`: the request's Range.

    async def download(self, job_id: str, owner: str | None, range_header: str | None = None) -> Response:
        """The result (Range and HEAD work; the same file name on both surfaces; name and type by its format)."""
        output_format = (await run_in_threadpool(self._job, job_id, owner)).params.output_format
        stored = await run_in_threadpool(self.manager.open_output, checked_id(job_id), owner)
        return object_response(stored, download_name(job_id, output_format), range_header=range_header,
                               media_type=OUTPUT_MEDIA_TYPES[output_format])

    async def input_file(self, job_id: str, kind: str, owner: str | None, range_header: str | None = None) -> Response:
        """A job's uploaded video or audio, for playback next to the result."""
        manager = self.manager
        if kind not in INPUT_KINDS:
            raise JobNotFoundError("Job not found")
        record = await run_in_threadpool(manager.get, checked_id(job_id), owner)
        name = record.video_file if kind == "video" else record.audio_file
        if name is None:  # an avatar's audio: it has none
            raise JobNotFoundError("Job input not found")
        shown = (record.video_filename if kind == "video" else record.audio_filename) or kind
        if is_avatar_reference(name):  # a job by avatar_id: the avatar's video, while the avatar exists
            reference = Path(await run_in_threadpool(manager.input_path, job_id, name, owner))
            avatar_id = str(read_reference(reference).get("avatar_id", ""))
            try:
                avatar = await run_in_threadpool(avatars.find_avatar, manager, avatar_id, owner)
                job_id, name = avatar.job_id, await run_in_threadpool(avatars.stored_name, manager, avatar, owner)
            except JobNotFoundError:
                raise JobNotFoundError("Job input not found") from None
        elif is_reference(name):  # given by URL: the fetched file, once the worker has it
            reference = Path(await run_in_threadpool(manager.input_path, job_id, name, owner))
            name = await run_in_threadpool(fetched_file, reference.parent, name)
            if name is None:
                raise JobNotFoundError("Job input not found")
        stored = await run_in_threadpool(manager.open_file, job_id, name, owner)
        # the job's own summary describes what it plays, an avatar's video included (admission probed it)
        demuxer = ((record.media or {}).get(kind) or {}).get("demuxer")
        media_type = INPUT_MEDIA_TYPES.get(str(demuxer), UNKNOWN_MEDIA_TYPE)
        return object_response(stored, shown, range_header=range_header, media_type=media_type, inline=True)

    async def credentials(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """The result's content credentials (the manifest the worker read back after signing)."""
        def read() -> dict[str, Any]:
            record = self._job(job_id, owner)
            if record.status is not JobStatus.completed:
                raise JobNotFinishedError(f"the job is {record.status.value}: its credentials come with its result")
            try:
                path = self.manager.input_path(job_id, CREDENTIALS_NAME, owner)
            except JobNotFoundError:
                raise NoCredentialsError("this job's result carries no content credentials (off on this server, "
                                       "or a webm output: C2PA defines no WebM embedding)") from None
            return json.loads(Path(path).read_text())

        return await run_in_threadpool(read)
    async def live_file(self, job_id: str, name: str, owner: str | None, range_header: str | None = None) -> Response:
        """The progressive output (media/hls.py): ``live.m3u8``, or a segment under ``live/`` by its served name.
        404 until the first segment is stored. Always streamed through this replica (never a presigned
        redirect: a player sends its token with each request, and a bucket refuses a token it did not sign)."""
        stored = hls.PLAYLIST_NAME if name == hls.PLAYLIST_NAME else hls.stored_name(name)
        if stored is None:
            raise JobNotFoundError("No such file of the job's progressive output")
        await run_in_threadpool(self._job, job_id, owner)
        try:
            obj = await run_in_threadpool(self.manager.open_file, job_id, stored, owner)
        except JobNotFoundError:
            raise JobNotFoundError("The job has no playable output yet") from None
        playlist = stored == hls.PLAYLIST_NAME
        response = object_response(obj, stored, range_header=range_header, allow_redirect=False, inline=True,
                                   media_type=hls.PLAYLIST_MEDIA_TYPE if playlist else hls.SEGMENT_MEDIA_TYPE)
        # the playlist grows (read it afresh each time); a listed segment never changes
        response.headers["cache-control"] = "no-cache" if playlist else "private, max-age=86400, immutable"
        return response

    async def thumbnail(self, job_id: str, owner: str | None) -> Response:
        # always a JPEG: admission and the worker write it (media/thumbnails.py), never the user
        stored = await run_in_threadpool(self.manager.open_file, checked_id(job_id), THUMBNAIL_NAME, owner)
        return object_response(stored, f"{job_id}.jpg", media_type="image/jpeg", inline=True)
